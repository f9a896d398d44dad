"""benchmarks/compositional.py at its shrunk size: trains the four variants and prints the keys."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _benchmark():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(
        "compositional_bench", REPO / "benchmarks" / "compositional.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_another_config_is_run_with_its_own_storage_and_shrunk_on_request(tmp_path, capsys):
    bench = _benchmark()
    raw = yaml.safe_load(bench.CONFIG.read_text())
    raw["bootstrap"]["negative_swaps"] = [["left", "right"]]
    raw["storage"] = "stores/negatives"
    variant = tmp_path / "variant" / "negatives.yaml"
    variant.parent.mkdir()
    variant.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    out.mkdir()

    written = yaml.safe_load(Path(bench.write_config(True, None, str(out), variant)).read_text())
    assert written["storage"] == str((variant.parent / "stores" / "negatives").resolve())
    assert written["bootstrap"]["negative_swaps"] == [["left", "right"]]
    assert written["bootstrap"]["trainer"]["max_steps"] == 10  # the shrunk sizes on top
    assert written["synthetic"]["num_pairs"] == bench.SHRUNK["synthetic"]["num_pairs"]

    with pytest.raises(SystemExit):
        bench.main(["--config", str(tmp_path / "missing.yaml")])
    assert f"--config {tmp_path / 'missing.yaml'}: no such file" in capsys.readouterr().err


def test_shrunk_benchmark_runs_and_reports_every_variant_and_key(tmp_path, capsys):
    bench = _benchmark()
    argv = ["--shrunk", "--storage", str(tmp_path / "store"), "--lost-samples", "10"]
    result = bench.main(argv)
    for key in (
        "unclip_overall_heldout",
        "best_color_attribution_heldout",
        "best_position_heldout",
    ):
        assert 0.0 <= result[key] <= 1.0
    assert result["config"] == str(bench.CONFIG)  # the JSON line says what it ran
    assert result["oracle_accuracy_real"] >= 0.99  # real images, whatever the tiny models draw
    assert set(result["scores"]) == {"unclip", "unclip_text", "text_tokens", "caption_transformer"}
    for scores in result["scores"].values():
        assert set(scores["heldout"]["images"]) == {
            "single_object",
            "two_object",
            "counting",
            "colors",
            "position",
            "color_attr",
        }
        # the upsampled images' scores, and the same samples' at the decoder's 32 px
        assert set(scores["before_upsampler"]) >= {"seen", "heldout"}
    assert result["image_size"] == 64 and set(result["oracle_accuracy_real_per_size"]) == {
        "32",
        "64",
    }
    assert 0.0 <= result["unclip_overall_heldout_before_upsampler"] <= 1.0
    lost = result["where_composition_is_lost"]
    assert set(lost) == {
        "real",
        "clip_near_miss",
        "unclip reconstruction",
        "unclip cascade",
        "unclip_text reconstruction",
        "unclip_text cascade",
        "heldout_pairs",
        "heldout_relations",
    }
    unseen = lost.pop("heldout_pairs")
    unnamed = lost.pop("heldout_relations")
    assert set(unnamed) == set(unseen) | {"clip_near_miss", "clip_picture_pick"}
    # each rendered held-out relation shows both objects, both colour-shape pairs and the relation
    assert unnamed["real"] == {"two_object": 1.0, "color_attr": 1.0, "position": 1.0}
    assert set(unnamed["clip_near_miss"]) == {"two_object", "color_attr", "position"}
    assert set(unnamed["clip_picture_pick"]) == {"position"}
    assert set(unseen) == {
        "real",
        *(f"{v} {s}" for v in ("unclip", "unclip_text") for s in ("reconstruction", "cascade")),
    }
    assert unseen["real"] == {"colors": 1.0, "single_object": 1.0}
    # every task the first 10 held-out samples check (which kinds they are follows the shard
    # order of the download, so it is read back, not assumed)
    assert set(lost["real"]) == lost_sample_tasks(bench, tmp_path, 10)
    assert min(lost["real"].values()) >= 0.99  # the real images meet what their captions say
    for row in [*lost.values(), *unseen.values(), *unnamed.values()]:
        assert all(0.0 <= v <= 1.0 for v in row.values())
    out = capsys.readouterr().out
    assert "where composition is lost: 10 held-out samples" in out  # the first 10 of ~24
    assert result["lost_samples"] == 10 and "unclip_text reconstruction" in out
    assert "held-out colour-shape pairs" in out
    relations_table = out.split("held-out relations, rendered")[1].split("\n{")[0]
    assert "clip_picture_pick" in relations_table and "unclip cascade" in relations_table
    seen_table = out.split("\nseen compositions, ")[1].split("where composition")[0]
    assert "unclip_text 32px" in seen_table
    assert "text_tokens" in out and out.strip().splitlines()[-1].startswith("{")


def lost_sample_tasks(bench, folder: Path, n: int) -> set[str]:  # noqa: ANN001
    """The tasks that the benchmark's first ``n`` held-out samples (of its shrunk store) check."""
    from unclip.datasets.storage import StorageLayout, read_json
    from unclip.pipelines.config import load_config

    cfg = load_config(bench.write_config(True, str(folder / "store"), str(folder)))
    layout = StorageLayout(cfg.storage)
    version = read_json(layout.latest_run("decoder"))["dataset_version"]
    _, checks = bench.first_samples(*bench.holdout_samples(cfg, layout, version), n)
    return {prompt.task for sample in checks for prompt, truth in sample if truth}


def test_variant_rows_take_the_split_asked_for_at_both_sizes():
    bench = _benchmark()
    scores = {
        v: {
            "heldout": {"overall": 0.1},
            "seen": {"overall": 0.2},
            "before_upsampler": {"heldout": {"overall": 0.3}, "seen": {"overall": 0.4}},
        }
        for v in bench.VARIANTS
    }
    rows = bench.variant_rows(scores, "seen", [32, 64])
    assert [label for label, _ in rows[:2]] == ["unclip 64px", "unclip 32px"]
    assert [row["overall"] for _, row in rows] == [0.2, 0.4] * len(bench.VARIANTS)
    assert [row["overall"] for _, row in bench.variant_rows(scores, "heldout", [32, 64])] == [
        0.1,
        0.3,
    ] * len(bench.VARIANTS)


def test_first_samples_cut_every_column_and_the_checks_alike():
    import numpy as np

    from unclip.datasets.readers import ImagePairs

    bench = _benchmark()
    n = 5
    pairs = ImagePairs(
        keys=[f"k{i}" for i in range(n)],
        captions=[f"c{i}" for i in range(n)],
        images=np.arange(n)[:, None, None, None] * np.ones((n, 2, 2, 3), np.uint8),
        image_emb=np.arange(n, dtype=np.float32)[:, None],
        text_emb=None,
    )
    checks = [[f"check{i}"] for i in range(n)]
    cut, cut_checks = bench.first_samples(pairs, checks, 3)
    assert cut.keys == ["k0", "k1", "k2"] and cut.captions == ["c0", "c1", "c2"]
    assert cut.images.shape == (3, 2, 2, 3) and cut.images[2].max() == 2
    assert cut.image_emb[:, 0].tolist() == [0.0, 1.0, 2.0] and cut.text_emb is None
    assert cut_checks == checks[:3]
    for everything in (0, n, n + 1):  # 0 and too many: all of them
        whole, whole_checks = bench.first_samples(pairs, checks, everything)
        assert whole.captions == pairs.captions and whole_checks == checks
