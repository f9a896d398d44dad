"""The demo config, shrunk, through the Dagster definitions on a 2-CPU local Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from shrunk_config import REPO, SHRINK

from unclip.datasets.embedding_file import vectors_to_numpy
from unclip.pipelines.config import load_config
from unclip.pipelines.runner import STAGES, run_pipeline


def _files(root: Path, pattern: str) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in root.glob(pattern)}


@pytest.mark.e2e
def test_demo_pipeline_end_to_end_then_rerun_does_no_work(tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["storage"] = str(tmp_path / "store")
    raw.setdefault("decoder", {}).setdefault("trainer", {})["report_to"] = ["tensorboard"]
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    cfg = load_config(config_path, SHRINK)
    store = Path(cfg.storage)

    run = run_pipeline(str(config_path), cfg, SHRINK)
    assert run.success
    assert set(run.stage_seconds) == set(STAGES)
    out = run.outputs

    # ingest: 240 pairs in shards of 100 → 3 webdataset tars of 64 px center crops
    tars = sorted(store.glob("images/*/*.tar"))
    assert len(tars) == 3
    assert run.total("image_shards", "shards_written") == 3

    # embeddings: one Parquet per shard, float16 L2-normalized
    parquets = sorted(store.glob("embeddings/*/*/*.parquet"))
    assert len(parquets) == 3
    t = pq.read_table(parquets[0])
    assert {"key", "caption", "url", "image_embedding", "text_embedding", "clip_score"} <= set(
        t.column_names
    )
    emb = vectors_to_numpy(t.column("image_embedding"))
    assert emb.shape[1] == 32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-2)

    # manifest: version = content hash, with stats
    version = out["dataset_manifest"].version
    manifest = json.loads((store / "manifests" / f"{version}.json").read_text())
    assert manifest["num_samples"] == out["dataset_manifest"].num_samples > 200
    assert len(manifest["shards"]) == 3

    # training: DeepSpeed checkpoints reported to Ray Train, metrics, exports
    for model in ("clip", "prior", "decoder", "upsampler"):
        runs = [p for p in (store / "runs" / model).iterdir() if p.is_dir()]
        assert len(runs) == 1, runs
        assert list(runs[0].glob("checkpoint_*")), f"no Ray Train checkpoint for {model}"
        assert (runs[0] / "export").is_dir()
        lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
        assert lines and "loss" in json.loads(lines[-1])

    # evaluation: prior cosine suite and a sample grid
    metrics = json.loads(Path(out["evaluation"].prior_metrics_path).read_text())
    for key in ("cos_pred_true", "cos_pred_text", "cos_pred_unrelated", "cos_text_baseline"):
        assert -1.0 <= metrics[key] <= 1.0
    grid = Image.open(out["evaluation"].sample_grid)
    assert grid.width >= 2 * 16 and grid.height >= 16
    # the cascade ends at the upsampler's 32 px, judged against the decoder's images upsampled
    # bilinearly
    cascade = json.loads(Path(out["evaluation"].decoder_metrics_path).read_text())
    assert cascade["image_size"] == 32 and isinstance(cascade["fd_clip_bilinear"], float)
    assert "fd_clip_vs_bilinear" in cascade["goals"]

    # the evaluation reached the decoder run's TensorBoard: its metrics and the sample grid
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (decoder_run,) = [p for p in (store / "runs" / "decoder").iterdir() if p.is_dir()]
    events = EventAccumulator(str(decoder_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"train/loss", "eval/fd_clip", "eval/clip_score"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["eval/samples"]

    # promotion: the first evaluated prior is promoted into the registry
    promoted = {o.model: o.status for o in out["promotion"]}
    assert promoted["prior"] == "first"
    # the upsampler is gated as the decoder is: the first one is promoted too, so `unclip
    # sample` and `unclip export` (which take the promoted runs) find the whole cascade
    assert promoted["decoder"] == promoted["upsampler"] == "first"
    registry = json.loads((store / "registry" / "prior.json").read_text())
    assert registry["dataset_version"] == version
    assert registry["run"] == out["prior"].run_name

    # Re-run: every stage sees its outputs; no download, embedding or training happens.
    before = {
        **_files(store, "images/*/*"),
        **_files(store, "embeddings/**/*.parquet"),
        **_files(store, "runs/*/*/checkpoint_*"),
        **_files(store, "manifests/*"),
    }
    again_run = run_pipeline(str(config_path), cfg, SHRINK)
    again = again_run.outputs
    after = {
        **_files(store, "images/*/*"),
        **_files(store, "embeddings/**/*.parquet"),
        **_files(store, "runs/*/*/checkpoint_*"),
        **_files(store, "manifests/*"),
    }
    assert after == before
    assert again_run.total("image_shards", "shards_written") == 0
    assert again_run.total("embeddings", "shards_written") == 0
    assert again["dataset_manifest"].version == version
    for model in ("clip_model", "prior", "decoder", "upsampler"):
        assert again[model].skipped is True, model
    assert {o.model: o.status for o in again["promotion"]}["prior"] == "current"

    # A rerun in a new process finds every stage done without loading a model library: the
    # finished runs, embeddings and evaluations are read from their records.
    code = (
        "import sys, json\n"
        "from unclip.pipelines.config import load_config\n"
        "from unclip.pipelines.runner import run_pipeline\n"
        f"overrides = json.loads({json.dumps(json.dumps(SHRINK))})\n"
        f"run = run_pipeline({str(config_path)!r}, load_config({str(config_path)!r}, overrides), "
        "overrides)\n"
        "assert run.success\n"
        "heavy = ('torch', 'open_clip', 'diffusers', 'deepspeed')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    rerun = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(rerun.stdout.strip().splitlines()[-1]) == []
