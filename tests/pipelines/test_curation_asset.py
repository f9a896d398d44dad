"""The curate asset between the embeddings and the manifest, materialized through Dagster."""

from __future__ import annotations

import os
import sys

import dagster as dg
import yaml

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

from training_helpers import CLIP_ID, SOURCE, build_embedded_store  # noqa: E402

from unclip.datasets.readers import load_embeddings, load_manifest  # noqa: E402
from unclip.datasets.semantic_dedup import current_version, removed_keys  # noqa: E402
from unclip.datasets.storage import StorageLayout, write_json  # noqa: E402
from unclip.pipelines.assets import ALL_ASSETS  # noqa: E402
from unclip.pipelines.resources import resources_for  # noqa: E402
from unclip.pipelines.status import kept_by_filter  # noqa: E402
from unclip.pipelines.value_store import value_path  # noqa: E402
from unclip.pipelines.values import to_json  # noqa: E402
from unclip.training.models.clip_pin import EmbeddingClip  # noqa: E402


def _store_with_a_pinned_clip(tmp_path):
    root = tmp_path / "store"
    build_embedded_store(str(root))
    layout = StorageLayout(str(root))
    registered = {"source": SOURCE, "url_list": str(tmp_path / "list.parquet")}
    write_json(layout.source_origin(SOURCE), registered)
    write_json(value_path(layout, "clip_model", None), to_json(EmbeddingClip(CLIP_ID, None, False)))
    return layout


def _materialize(tmp_path, layout, **config):
    path = tmp_path / "c.yaml"
    sources = [str(tmp_path / "list.parquet")]  # registered with the store; never read here
    path.write_text(yaml.safe_dump({"storage": layout.root, "sources": sources, **config}))
    names = {"curated_embeddings", "dataset_manifest"}
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            ALL_ASSETS,
            selection=[a for a in ALL_ASSETS if a.key.to_user_string() in names],
            instance=instance,
            resources=resources_for(str(path)),
        )
    assert result.success
    return result


def test_the_curate_asset_feeds_the_manifest_its_removal_lists(tmp_path):
    layout = _store_with_a_pinned_clip(tmp_path)
    plain = _materialize(tmp_path, layout)
    assert plain.output_for_node("curated_embeddings") is None  # off unless configured
    curated = _materialize(
        tmp_path,
        layout,
        manifest={"semantic_dedup": True},
        semantic_dedup={"similarity": 0.6, "cluster_size": 20},
    )
    run = curated.output_for_node("curated_embeddings")
    assert run.version == current_version(layout, CLIP_ID) and run.partitions_new == 1
    removed = removed_keys(layout, CLIP_ID)
    assert 0 < len(removed) == run.removed_new
    version = curated.output_for_node("dataset_manifest")
    assert version.version != plain.output_for_node("dataset_manifest").version
    m = load_manifest(layout, version.version)
    assert not removed & set(load_embeddings(layout, m, "all", 0.0).keys)
    meta = curated.asset_materializations_for_node("dataset_manifest")[0].metadata
    assert (
        "kept_by_filter" in meta and "semantic_dedup" in kept_by_filter(layout, m)["kept_by_filter"]
    )
