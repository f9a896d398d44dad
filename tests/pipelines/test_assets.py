"""Assets materialized through Dagster with the pipeline's resources, swapped per test."""

from __future__ import annotations

import json

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from unclip.datasets import synthetic
from unclip.datasets.config import SyntheticConfig
from unclip.pipelines.assets import image_shards, url_lists
from unclip.pipelines.config import load_config
from unclip.pipelines.resources import resources_for
from unclip.pipelines.runner import register_sources
from unclip.pipelines.values import IngestSummary, PromotionOutcome, from_json, to_json
from unclip.training.engine.fit_result import FitResult

ROWS = 8
INGEST = {
    "image_size": 32,
    "resize_mode": "center_crop",
    "samples_per_shard": 24,
    "thread_count": 4,
    "allow_private_networks": True,
}


def _config(tmp_path, url_list, storage):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "storage": str(storage),
                "sources": [str(url_list)],
                "ray": {"num_cpus": 2},
                "ingest": INGEST,
            }
        )
    )
    return config


def _url_list(path, base_url, data):
    """The synthetic pairs plus one URL the server answers with 404."""
    table = synthetic.url_list_table(data, base_url).select(["url", "caption"])
    bad = pa.table({"url": [f"{base_url}/999999.png"], "caption": ["a missing square"]})
    pq.write_table(pa.concat_tables([table, bad]), path)


def test_values_round_trip_through_json():
    values = [
        IngestSummary("s", 1, 0, 8, 1, False, ["w"], ["summary"]),
        FitResult("prior-abc", "/r", "/r/export", {"loss": 0.5}, skipped=True),
        [PromotionOutcome("prior", "prior-abc", "first", True, ["no promoted prior"])],
        None,
    ]
    for value in values:
        assert from_json(json.loads(json.dumps(to_json(value)))) == value
    with pytest.raises(ValueError, match="unknown type 'Nope'"):
        from_json({"__type__": "Nope"})


def test_assets_write_their_values_to_the_storage_resource_not_the_config_root(tmp_path):
    """A test (or a deployment) swaps the storage root by swapping the resource alone."""
    url_list = tmp_path / "list.parquet"
    _url_list(url_list, "http://127.0.0.1:9", SyntheticConfig(num_pairs=ROWS))
    config = _config(tmp_path, url_list, tmp_path / "configured")
    other = tmp_path / "other"
    cfg = load_config(config).model_copy(update={"storage": str(other)})
    with dg.instance_for_test() as instance:
        (sid,) = register_sources(cfg, instance)
        result = dg.materialize(
            [url_lists],
            partition_key=sid,
            instance=instance,
            resources=resources_for(str(config), storage=str(other)),
        )
    assert result.success
    assert result.output_for_node("url_lists").rows == ROWS + 1
    stored = json.loads((other / "values" / "url_lists" / f"{sid}.json").read_text())
    assert stored["rows"] == ROWS + 1 and stored["source"] == sid
    assert not (tmp_path / "configured").exists()


def test_ingest_asset_starts_ray_only_for_work_and_retries_through_its_config(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    data = SyntheticConfig(num_pairs=ROWS, image_size=32, seed=5)
    store = tmp_path / "store"
    try:
        with synthetic.serve_synthetic(data) as base_url:
            url_list = tmp_path / "list.parquet"
            _url_list(url_list, base_url, data)
            config = _config(tmp_path, url_list, store)
            resources = resources_for(str(config))
            with dg.instance_for_test() as instance:
                (sid,) = register_sources(load_config(config), instance)

                def ingest(**kw):
                    result = dg.materialize(
                        [url_lists, image_shards],
                        partition_key=sid,
                        instance=instance,
                        resources=resources,
                        **kw,
                    )
                    assert result.success
                    return result.output_for_node("image_shards")

                first = ingest()
                assert (first.shards_written, first.successes, first.failures) == (1, ROWS, 1)
                assert ray.is_initialized()  # there was work: Ray started for it
                ray.shutdown()

                again = ingest()
                assert again.skipped and again.shards_written == 0
                assert not ray.is_initialized()  # nothing to download: Ray never started

                retry = {"ops": {"image_shards": {"config": {"retry_failed": True}}}}
                retried = ingest(run_config=retry, selection=[image_shards])
                # the failed row went to a new shard; the finished shard was left as it was
                assert retried.shards_written == 1 and not retried.skipped
        assert sorted(p.name for p in (store / "images" / sid).glob("*.tar")) == [
            "00000.tar",
            "00001.tar",
        ]
    finally:
        ray.shutdown()
