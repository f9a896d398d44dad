"""A LAION-shaped run: parquet parts by glob (URL / TEXT / punsafe), a ViT-B-32 at 224 px, no
synthetic section — ingest to prior and decoder steps, an evaluation without shape metrics, and
a promotion gate deciding on the metrics that exist."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from shrunk_config import TINY_TRAINER

from unclip.datasets.config import SyntheticConfig
from unclip.datasets.synthetic import serve_synthetic, url_list_table
from unclip.pipelines.config import load_config
from unclip.pipelines.runner import run_pipeline

IMAGES = SyntheticConfig(num_pairs=24, image_size=64, seed=5)


def _laion_parts(folder: Path, base_url: str) -> None:
    """Two LAION-shaped parts (URL, TEXT, punsafe, similarity); every fourth row is unsafe."""
    t = url_list_table(IMAGES, base_url)
    n = t.num_rows
    laion = pa.table(
        {
            "URL": t.column("url"),
            "TEXT": t.column("caption"),
            "punsafe": [0.9 if i % 4 == 3 else 0.05 for i in range(n)],
            "similarity": [0.3] * n,
        }
    )
    folder.mkdir()
    pq.write_table(laion.slice(0, n // 2), folder / "part-00000.parquet")
    pq.write_table(laion.slice(n // 2), folder / "part-00001.parquet")


def _config(tmp_path: Path) -> Path:
    # batch 2 per worker: the 2 workers need 4 training pairs of the 18 kept (see the split below)
    tiny = {**TINY_TRAINER, "max_steps": 4, "checkpoint_every": 4, "batch_size": 2}
    raw = {
        "name": "laion-shaped",
        "storage": str(tmp_path / "store"),
        "sources": [
            {
                "path": str(tmp_path / "laion" / "part-*.parquet"),
                "url_col": "URL",
                "caption_col": "TEXT",
                "metadata": {"punsafe": {"lt": 0.5}},
            }
        ],
        "ray": {"num_cpus": 2},
        "ingest": {
            "image_size": 224,
            "samples_per_shard": 16,
            "thread_count": 4,
            "allow_private_networks": True,
        },
        "clip": {"model_name": "ViT-B-32"},  # pretrained unset: seeded random weights
        "embed": {"batch_size": 8},
        "prior": {
            "num_layers": 1,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "sample_steps": 3,
            "trainer": tiny,
        },
        "decoder": {
            "image_size": 16,
            "block_out_channels": [16, 32],
            "sample_steps": 3,
            "trainer": tiny,
        },
        "evaluate": {
            # the split hashes keys under a source id made from the URLs (the server's port
            # differs per run): of 18 kept rows, 0.4 leaves no hold-out pair with probability
            # 0.6^18 ≈ 1e-4 (0.25: 0.6 %), and fewer than the 4 training pairs the trainers need
            # with probability P(≥ 15 held out) ≈ 2e-4 (a batch of 4 per worker needs 8 pairs:
            # P(≥ 11 held out) ≈ 6 %, a failure seen once)
            "holdout_fraction": 0.4,
            "samples_per_caption": 1,
            "num_eval_samples": 4,
            "eval_steps": 2,
            "eval_workers": 1,
        },
    }
    path = tmp_path / "laion.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.e2e
def test_laion_shaped_parts_go_from_ingest_to_a_gated_promotion(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    config_path = _config(tmp_path)
    with serve_synthetic(IMAGES) as base_url:
        _laion_parts(tmp_path / "laion", base_url)
        cfg = load_config(config_path)
        assert [g.metric for g in cfg.promotion.models["decoder"]] == ["fd_clip", "clip_score"]
        run = run_pipeline(str(config_path), cfg)
    assert run.success
    out, store = run.outputs, Path(cfg.storage)

    # two parts, two sources (partitions); punsafe ≥ 0.5 rows dropped before download
    assert len(run.partitions) == 2
    plans = [json.loads(p.read_text()) for p in sorted(store.glob("images/*/_plan.json"))]
    assert [p["num_rows"] for p in plans] == [9, 9]
    assert all(p["filtered_before_download"].get("metadata:punsafe") == 3 for p in plans)
    assert len(sorted(store.glob("images/*/*.tar"))) == 2  # one shard per source

    # embedded by the ViT-B-32 (D = 512) at its 224 px input
    manifest = json.loads(
        (store / "manifests" / f"{out['dataset_manifest'].version}.json").read_text()
    )
    assert manifest["embedding_dim"] == 512 and manifest["num_samples"] == 18
    identity = json.loads((store / "clip" / manifest["clip_id"] / "identity.json").read_text())
    assert identity["model_cfg"]["vision_cfg"]["image_size"] == 224

    # evaluation: no shape metric; the gate decides on fd_clip and clip_score
    metrics = json.loads(Path(out["evaluation"].decoder_metrics_path).read_text())
    assert metrics["attribute_accuracy"] is None
    assert metrics["fd_clip"] >= 0 and 0 <= metrics["clip_score"] <= 100
    promoted = {o.model: o.status for o in out["promotion"]}
    assert promoted == {"prior": "first", "decoder": "first"}, out["promotion"]
    decision = json.loads((store / "eval" / out["decoder"].run_name / "promotion.json").read_text())
    assert [g["metric"] for g in decision["gates"]] == ["fd_clip", "clip_score"]
    registry = json.loads((store / "registry" / "decoder.json").read_text())
    assert registry["run"] == out["decoder"].run_name
    assert registry["metrics"]["fd_clip"] == metrics["fd_clip"]
