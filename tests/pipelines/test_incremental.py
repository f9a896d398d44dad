"""A new URL list on a corpus of 5 ingests and embeds only itself, and a
scheduled retraining on an unchanged manifest skips instead of starting over."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from shrunk_config import TINY_TRAINER as SHRUNK_TRAINER

from unclip.datasets import synthetic, url_lists
from unclip.datasets.config import SyntheticConfig
from unclip.pipelines.config import load_config
from unclip.pipelines.definitions import build_definitions
from unclip.pipelines.resources import UnclipConfigResource
from unclip.pipelines.runner import instance_for, run_pipeline

ROWS = 24  # per list: one shard each
# the shared tiny trainer (tests/shrunk_config.py), 4 steps with a checkpoint at the end
TINY_TRAINER = {**SHRUNK_TRAINER, "warmup_steps": 1, "checkpoint_every": 4, "max_steps": 4}
CONFIG = {
    "ray": {"num_cpus": 2},
    "sensor": {"min_age_seconds": 0},
    "ingest": {
        "image_size": 32,
        "resize_mode": "center_crop",
        "samples_per_shard": ROWS,
        "thread_count": 8,
        "allow_private_networks": True,
    },
    "clip": {
        "embed_dim": 16,
        "image_size": 32,
        "patch_size": 8,
        "vision_width": 32,
        "vision_layers": 1,
        "text_width": 32,
        "text_layers": 1,
        "heads": 2,
        "context_length": 16,
    },
    "bootstrap": {"trainer": TINY_TRAINER},
    "embed": {"batch_size": 32},
    "prior": {
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "sample_steps": 3,
        "trainer": TINY_TRAINER,
    },
    "decoder": {
        "image_size": 16,
        "block_out_channels": [16, 32],
        "sample_steps": 3,
        "trainer": {**TINY_TRAINER, "zero_stage": 2},
    },
    "evaluate": {
        "holdout_fraction": 0.1,
        "captions": ["a red circle", "a blue square"],
        "samples_per_caption": 1,
    },
}


UP_TO_TRAINING = [
    "url_lists",
    "image_shards",
    "clip_model",
    "embeddings",
    "dataset_manifest",
    "prior",
    "decoder",
]
RETRAIN_TRAINING = ["dataset_manifest", "prior", "decoder", "upsampler"]


def _snapshot(store: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every file: a rewrite changes one of them, even with equal bytes."""
    return {
        str(p.relative_to(store)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in store.glob(pattern)
        if p.is_file()
    }


@pytest.mark.e2e
def test_new_list_ingests_only_itself_and_retraining_skips(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    store = tmp_path / "store"
    data = SyntheticConfig(num_pairs=6 * ROWS, image_size=32, seed=3)
    with synthetic.serve_synthetic(data) as base_url:
        table = synthetic.url_list_table(data, base_url)
        lists = tmp_path / "lists"
        lists.mkdir()
        for i in range(6):
            pq.write_table(table.slice(i * ROWS, ROWS), lists / f"part-{i}.parquet")
        config = tmp_path / "c.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "storage": str(store),
                    "sources": [str(lists / f"part-{i}.parquet") for i in range(5)],
                    **CONFIG,
                }
            )
        )
        cfg = load_config(config)

        # 1. the corpus of 5 lists, through training (promotion has its own tests and e2e)
        first = run_pipeline(str(config), cfg, select=dg.AssetSelection.assets(*UP_TO_TRAINING))
        assert len(first.partitions) == 5
        assert first.total("image_shards", "shards_written") == 5
        assert first.total("embeddings", "shards_written") == 5
        assert len(list(store.glob("images/*/*.tar"))) == 5
        version = first.outputs["dataset_manifest"].version
        assert json.loads((store / "runs/prior/latest.json").read_text())["dataset_version"] == (
            version
        )

        # 2. the schedule's job on an unchanged manifest: same version, training skipped
        defs = build_definitions(str(config))
        instance = instance_for(cfg)
        trained = _snapshot(store, "runs/**/*")
        retrain = defs.resolve_job_def("retrain").execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(k) for k in RETRAIN_TRAINING]
        )
        assert retrain.success
        assert retrain.output_for_node("dataset_manifest").version == version
        for model in ("prior", "decoder"):
            assert retrain.output_for_node(model).skipped is True, model
        assert _snapshot(store, "runs/**/*") == trained

        # 3. a sixth list arrives in the inbox: the sensor makes it a partition and a run
        before = {
            **_snapshot(store, "images/**/*"),
            **_snapshot(store, "embeddings/**/*"),
            **_snapshot(store, "runs/clip/**/*"),
        }
        clip_pin = (store / "runs" / "clip" / "latest.json").read_text()
        inbox = store / "incoming"
        inbox.mkdir()
        (inbox / "part-5.parquet").write_bytes((lists / "part-5.parquet").read_bytes())
        new_sid = url_lists.source_id(str(inbox / "part-5.parquet"))
        sensor = defs.resolve_sensor_def("inbox")
        tick = sensor(
            dg.build_sensor_context(
                instance=instance,
                resources={"unclip": UnclipConfigResource(config_path=str(config))},
            )
        )
        (request,) = tick.run_requests
        assert request.partition_key == new_sid
        for add in tick.dynamic_partitions_requests:  # what the daemon does with them
            instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
        run = defs.resolve_job_def(request.job_name).execute_in_process(
            instance=instance, partition_key=request.partition_key, tags=request.tags
        )
        assert run.success
        assert run.output_for_node("image_shards").shards_written == 1
        assert run.output_for_node("embeddings").shards_written == 1

        after = {
            **_snapshot(store, "images/**/*"),
            **_snapshot(store, "embeddings/**/*"),
            **_snapshot(store, "runs/clip/**/*"),
        }
        # nothing that existed was rewritten; everything new belongs to the new source
        assert {k: after[k] for k in before} == before
        new = sorted(set(after) - set(before))
        assert new and all(new_sid in k for k in new), new
        assert [k for k in new if k.endswith(".tar")] == [f"images/{new_sid}/00000.tar"]
        assert len([k for k in new if k.startswith("embeddings/") and k.endswith(".parquet")]) == 1
        # the CLIP stays pinned: same run, so every other source keeps its embeddings
        assert (store / "runs" / "clip" / "latest.json").read_text() == clip_pin

        # 4. the next manifest covers all six sources with the same CLIP
        manifest = defs.resolve_job_def("retrain").execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("dataset_manifest")]
        )
        out = manifest.output_for_node("dataset_manifest")
        assert out.version != version and out.num_shards == 6
