"""``unclip import-embeddings`` / ``export-embeddings`` from the command line."""

import numpy as np
from typer.testing import CliRunner

from unclip.datasets.embedding_import import imported_clip_id
from unclip.datasets.manifest import latest_manifest
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic_embeddings import write_clip_retrieval
from unclip.pipelines.cli import app


def test_import_assembles_a_manifest_and_export_writes_the_layout(tmp_path):
    src = tmp_path / "laion"
    write_clip_retrieval(str(src), [9, 4], 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage: store\n")
    runner = CliRunner()
    args = [
        "import-embeddings",
        str(cfg),
        str(src),
        "--model",
        "ViT-B-32",
        "--pretrained",
        "openai",
    ]
    r = runner.invoke(app, [*args, "--rows-per-shard", "5"])
    assert r.exit_code == 0, r.output
    assert "imported 13 pairs" in r.output
    m = latest_manifest(StorageLayout(str(tmp_path / "store")))
    assert m["clip_id"] == imported_clip_id("ViT-B-32", "openai") and m["num_samples"] == 13
    assert m["version"] in r.output
    r = runner.invoke(app, ["export-embeddings", str(cfg), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    parts = sorted((tmp_path / "out" / "img_emb").glob("*.npy"))
    assert [p.name for p in parts] == [f"img_emb_{i:05d}.npy" for i in range(3)]
    assert sum(len(np.load(p)) for p in parts) == 13
    r = runner.invoke(app, [*args, "--caption-col", "TEXT", "--source", "other"])
    assert r.exit_code == 1 and "no column 'TEXT' (--caption-col)" in r.output
