"""Fixtures for unclip.datasets: tiny configs and a storage root with ingested, embedded shapes.

``shapes_store`` is built once per session without Ray (the shard function and the embedding
function are plain functions; Ray only schedules them), and each test gets its own copy.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from unclip.datasets import clip as clip_mod
from unclip.datasets.config import ClipConfig, IngestConfig, SyntheticConfig
from unclip.datasets.embed import embed_shard
from unclip.datasets.ingest import download_shard, plan_source
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic import serve_synthetic, write_url_list

TINY_CLIP = ClipConfig(
    embed_dim=32,
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=1,
    text_width=64,
    text_layers=1,
    heads=2,
    context_length=16,
)


@pytest.fixture
def tiny_clip_cfg() -> ClipConfig:
    return TINY_CLIP


def ingest_cfg(**kw) -> IngestConfig:
    base = {
        "samples_per_shard": 20,
        "thread_count": 4,
        "timeout_s": 5.0,
        "allow_private_networks": True,
        "shard_retries": 0,
    }
    return IngestConfig(**{**base, **kw})


@dataclass
class Store:
    root: Path
    layout: StorageLayout
    source: str
    clip_checkpoint: str
    clip_id: str
    shards: list[int]


def ingest_without_ray(layout: StorageLayout, url_list: str, cfg: IngestConfig) -> str:
    plan = plan_source(layout, url_list, cfg)
    for shard in plan.pending:
        download_shard(layout.root, plan.source_id, shard, cfg)
    return plan.source_id


@pytest.fixture(scope="session")
def _shapes_store_base(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("shapes_store")
    layout = StorageLayout(str(root))
    syn = SyntheticConfig(num_pairs=40, image_size=48, seed=3)
    url_list = str(root / "lists" / "shapes.parquet")
    with serve_synthetic(syn) as base:
        write_url_list(syn, base, url_list)
        source = ingest_without_ray(layout, url_list, ingest_cfg(image_size=32))
    torch.manual_seed(0)
    ckpt = clip_mod.save_clip(
        clip_mod.build_bootstrap_clip(TINY_CLIP), TINY_CLIP, str(root / "clip" / "bootstrap")
    )
    bundle = clip_mod.load_clip(TINY_CLIP, ckpt)
    for shard in (0, 1):
        embed_shard(layout, bundle, source, shard, batch_size=16)
    return Store(root, layout, source, ckpt, bundle.clip_id, [0, 1])


@pytest.fixture
def shapes_store(_shapes_store_base: Store, tmp_path: Path) -> Store:
    """A private copy of a root with 1 source, 2 shards of 20 shapes (32 px), tiny-CLIP embeddings."""
    root = tmp_path / "store"
    shutil.copytree(_shapes_store_base.root, root)
    base = _shapes_store_base
    return Store(
        root,
        StorageLayout(str(root)),
        base.source,
        str(root / "clip" / "bootstrap"),
        base.clip_id,
        base.shards,
    )
