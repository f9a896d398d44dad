"""Evaluation: the cosine suite's parts, and captions → CLIP → prior → decoder → PNG grid."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_CLIP
from training_helpers import HOLDOUT, TINY_DECODER, export_untrained_cascade, make_prior_task

from unclip.datasets.storage import exists, read_json
from unclip.datasets.synthetic import PALETTE
from unclip.pipelines.config import CASCADE_GATE_METRICS, PRIOR_GATE_METRICS
from unclip.training.config import EvaluateConfig
from unclip.training.engine.fit_result import FitResult
from unclip.training.evaluation import cascade_eval
from unclip.training.evaluation.cascade_eval import CascadeEvalOptions, evaluate_cascade
from unclip.training.evaluation.cascade_generation import split
from unclip.training.evaluation.cascade_record import DECODER_METRICS_FILE, REPORT_FILE, CascadeRuns
from unclip.training.evaluation.prior_eval import (
    caption_grid,
    prior_cosines,
    unrelated_index,
    write_sample_grid,
)
from unclip.training.sampling import generate


def test_unrelated_index_picks_another_caption():
    caps = ["a", "a", "b", "c", "c"]
    idx = unrelated_index(caps)
    assert all(caps[j] != caps[i] for i, j in enumerate(idx))
    assert list(unrelated_index(["x", "x"])) == [1, 0]


def test_the_prior_gate_metrics_are_what_the_prior_evaluation_writes():
    x = torch.randn(4, 8)
    assert set(prior_cosines(x, x, x, np.roll(np.arange(4), 1))) == set(PRIOR_GATE_METRICS)


def test_prior_cosines_of_perfect_predictions():
    image = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    text = torch.nn.functional.normalize(image + 0.1 * torch.randn(6, 8), dim=-1)
    m = prior_cosines(image.clone(), image, text, np.roll(np.arange(6), 1))
    assert m["cos_pred_true"] == pytest.approx(1.0)
    assert m["cos_pred_text"] == pytest.approx(m["cos_text_baseline"])
    assert m["cos_pred_unrelated"] < 0.9


def test_caption_grid_puts_each_captions_images_in_its_row_above_its_caption():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    images = [Image.new("RGB", (16, 16), c) for c in colours]
    grid = np.asarray(caption_grid(images, ["a red one", "a blue one"], per_caption=2, cell=32))
    pad, text_h, cell = 4, 22, 32
    row_h = cell + text_h + pad
    assert grid.shape == (2 * row_h + pad, 2 * (cell + pad) + pad, 3)
    for r in range(2):
        y = pad + r * row_h
        for k in range(2):
            x = pad + k * (cell + pad)
            # the whole cell is the image, resized: row r holds images r*2 .. r*2+1 in order
            assert (grid[y : y + cell, x : x + cell] == colours[2 * r + k]).all(), (r, k)
        caption = grid[y + cell : y + cell + text_h]
        assert (caption.sum(-1) < 200).any(), f"no caption text under row {r}"
    assert (grid[:pad] == 255).all()  # white margin


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """An untrained tiny CLIP, prior and decoder, exported as the training entry points do."""
    root = tmp_path_factory.mktemp("exports")
    return export_untrained_cascade(str(root))


def test_generate_and_write_a_sample_grid(exports, embedded_store, tmp_path):
    clip_dir, prior_dir, decoder_dir = exports
    images = generate(
        ["a red circle", "a blue square"],
        TINY_CLIP,
        clip_dir,
        prior_dir,
        decoder_dir,
        2,
        decoder_num_inference_steps=2,
    )
    assert len(images) == 4 and images[0].size == (16, 16)
    cfg = EvaluateConfig(captions=["a red circle", "a green triangle"], samples_per_caption=2)
    out = write_sample_grid(
        embedded_store.layout,
        TINY_CLIP,
        clip_dir,
        prior_dir,
        decoder_dir,
        cfg,
        str(tmp_path / "grid.png"),
    )
    with Image.open(out) as grid:
        assert grid.size[1] > 2 * 16


def test_bad_captions_are_clear_errors(exports):
    clip_dir, prior_dir, decoder_dir = exports
    with pytest.raises(ValueError, match="empty caption"):
        generate(["a red circle", "  "], TINY_CLIP, clip_dir, prior_dir, decoder_dir)
    with pytest.raises(ValueError, match="longer than the CLIP context"):
        generate(["a red circle " * 10], TINY_CLIP, clip_dir, prior_dir, decoder_dir)
    with pytest.raises(ValueError, match="guidance"):
        generate(
            ["a red circle"],
            TINY_CLIP,
            clip_dir,
            prior_dir,
            decoder_dir,
            decoder_guidance_scale=0.0,
        )


# --- the cascade evaluation (decoder_metrics.json + report.html) --------------------------------


def _fits(exports, tmp_path, name: str) -> tuple[FitResult, FitResult]:
    _, prior_dir, decoder_dir = exports
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    Image.new("RGB", (40, 30), "navy").save(run_dir / "loss.png")  # a stand-in loss curve
    prior = FitResult(run_name="prior-t", run_dir=str(tmp_path), export_dir=prior_dir)
    return prior, FitResult(run_name=name, run_dir=str(run_dir), export_dir=decoder_dir)


def test_evaluate_cascade_pools_workers_and_writes_metrics_and_report(
    ray_local, exports, embedded_store, tmp_path, monkeypatch, caplog
):
    clip_dir = exports[0]
    prior_fit, decoder_fit = _fits(exports, tmp_path, "decoder-eval-test")
    cfg = EvaluateConfig(
        holdout_fraction=HOLDOUT, num_eval_samples=6, eval_steps=2, eval_workers=2, eval_seed=1
    )
    layout = embedded_store.layout
    options = CascadeEvalOptions(
        palette={c: PALETTE[c] for c in ("red", "green", "blue", "yellow", "purple", "orange")},
        prior_metrics={"cos_pred_true": 0.5},
        loss_curves={"decoder": f"{decoder_fit.run_dir}/loss.png", "prior": "/nonexistent.png"},
    )
    runs = CascadeRuns(prior_fit, decoder_fit, TINY_DECODER, TINY_CLIP, clip_dir)
    with caplog.at_level(logging.INFO, logger="unclip.training.evaluation.cascade_generation"):
        m = evaluate_cascade(layout, embedded_store.version, runs, cfg, options)
    # a progress line per finished task: trained and untrained cascades, 2 workers each
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluation:")]
    assert [p.split(" images")[0] for p in progress] == [
        f"evaluation: {n}/12" for n in (3, 6, 9, 12)
    ]
    assert all(p.split("(")[1].startswith(f"{i}/4 tasks") for i, p in enumerate(progress, 1))

    out = f"{layout.eval_dir(decoder_fit.run_name)}"
    saved = read_json(f"{out}/{DECODER_METRICS_FILE}")
    assert saved == json.loads(json.dumps(m))
    for key in ("attribute_accuracy", "fd_clip", "fd_clip_untrained", "clip_score"):
        assert isinstance(saved[key], float) and np.isfinite(saved[key]), key
    assert 0.0 <= saved["attribute_accuracy"] <= 1.0
    assert saved["clip_score_real"] >= 0 and saved["fid"] is None
    assert saved["num_samples"] == 6 and saved["num_workers"] == 2 and saved["image_size"] == 16
    assert saved["data_version"] == embedded_store.version
    assert saved["holdout_fraction"] == HOLDOUT
    # no upsampler: no bilinear baseline and no goal against it
    assert saved["fd_clip_bilinear"] is None and "fd_clip_vs_bilinear" not in saved["goals"]
    # Every metric a promotion gate may name is one the evaluation writes.
    assert set(CASCADE_GATE_METRICS) <= set(saved)
    assert saved["goals"]["fd_clip_ratio"]["value"] == pytest.approx(
        saved["fd_clip"] / saved["fd_clip_untrained"]
    )
    assert exists(f"{out}/untrained_decoder_seed1/untrained.json")
    report = open(f"{out}/{REPORT_FILE}").read()
    assert report.count("data:image/png;base64,") >= 4  # 3 grids + the decoder's loss curve
    assert "fd_clip_untrained" in report and "cos_pred_true" in report
    assert "no loss curve at /nonexistent.png" in report

    # Idempotent: the same runs and settings do no work.
    def no_work(jobs, device="auto"):
        raise AssertionError("re-ran generation although the metrics are there")

    monkeypatch.setattr(cascade_eval, "run_chunks", no_work)
    assert evaluate_cascade(layout, embedded_store.version, runs, cfg, options) == saved
    # Other settings are a different evaluation.
    with pytest.raises(AssertionError, match="re-ran"):
        other = cfg.model_copy(update={"eval_seed": 2})
        evaluate_cascade(layout, embedded_store.version, runs, other, options)


def test_evaluate_cascade_without_synthetic_palette_has_no_attribute_accuracy_but_fid_and_kid(
    ray_local, exports, embedded_store, tmp_path
):
    """Real data: no shape check; FID and KID from the configured FID Inception weights, each
    metric with its protocol (weights sha256, resize, sample counts) in the JSON and the report."""
    from training_helpers import write_random_fid_inception

    weights = str(tmp_path / "weights-inception-2015-12-05.pt")
    sha = write_random_fid_inception(weights)
    prior_fit, decoder_fit = _fits(exports, tmp_path, "decoder-eval-nopalette")
    cfg = EvaluateConfig(
        holdout_fraction=HOLDOUT,
        num_eval_samples=4,
        eval_steps=1,
        eval_workers=1,
        inception_checkpoint=weights,
    )
    runs = CascadeRuns(prior_fit, decoder_fit, TINY_DECODER, TINY_CLIP, exports[0])
    m = evaluate_cascade(embedded_store.layout, embedded_store.version, runs, cfg)
    assert m["attribute_accuracy"] is None and m["goals"]["attribute_accuracy"]["met"] is None
    assert m["num_workers"] == 1 and m["num_samples"] == 4
    for key in ("fid", "fid_untrained", "kid", "kid_untrained"):
        assert isinstance(m[key], float) and np.isfinite(m[key]), key
    assert m["fid"] > 0 and m["kid_std"] == 0.0  # 4 samples: KID of the whole sets
    protocols = m["protocols"]
    assert "attribute_accuracy" not in protocols
    assert {"fd_clip", "clip_score", "fid", "kid"} <= set(protocols)
    for key in ("fid", "kid"):
        assert protocols[key]["weights_sha256"] == sha
        assert "clean-fid" in protocols[key]["resize"]
        assert (protocols[key]["num_generated"], protocols[key]["num_real"]) == (4, m["num_real"])
    report = open(f"{embedded_store.layout.eval_dir(decoder_fit.run_name)}/{REPORT_FILE}").read()
    assert "How each metric was computed" in report and sha in report


def test_split_covers_every_caption_in_order():
    items = [str(i) for i in range(7)]
    chunks = split(items, 3)
    assert [off for off, _ in chunks] == [0, 2, 5]
    assert sum((c for _, c in chunks), []) == items
    assert len(split(items[:2], 5)) == 2


# --- what is evaluated: the hold-out split, never the training rows -----------------------------


def test_the_prior_is_evaluated_on_the_holdout_pairs_only(embedded_store, tmp_path):
    from training_helpers import CLIP_ID, DIM

    from unclip.datasets import readers
    from unclip.training.evaluation.prior_eval import evaluate_prior

    layout, version = embedded_store.layout, embedded_store.version
    task = make_prior_task(dim=DIM, clip_id=CLIP_ID)
    torch.manual_seed(0)
    task.export(task.build_model(), str(tmp_path / "prior"))
    fit = FitResult("prior-holdout-test", str(tmp_path), str(tmp_path / "prior"))
    out = str(tmp_path / "m.json")
    m = evaluate_prior(
        layout, version, fit, EvaluateConfig(holdout_fraction=HOLDOUT), HOLDOUT, out_path=out
    )
    held = readers.load_embeddings(layout, embedded_store.manifest, "holdout", HOLDOUT)
    train = readers.load_embeddings(layout, embedded_store.manifest, "train", HOLDOUT)
    assert m["num_pairs"] == len(held.keys) != len(train.keys)
    text, image = (
        torch.nn.functional.normalize(torch.from_numpy(x), dim=-1) for x in (held.text, held.image)
    )
    assert m["cos_text_baseline"] == pytest.approx(float((text * image).sum(-1).mean()), abs=1e-6)
    assert (m["split"], m["holdout_fraction"], m["clip_id"]) == ("holdout", HOLDOUT, CLIP_ID)
    assert read_json(out) == json.loads(json.dumps(m))


def test_the_cascade_compares_with_the_holdout_images_only(embedded_store):
    from unclip.datasets import readers
    from unclip.training.evaluation.cascade_eval import held_out_set

    layout, version = embedded_store.layout, embedded_store.version
    held = held_out_set(layout, version, HOLDOUT, 7, palette=None)
    pairs = readers.load_image_pairs(layout, embedded_store.manifest, "holdout", HOLDOUT)
    assert held.real_captions == list(pairs.captions)
    np.testing.assert_array_equal(held.real_images, pairs.images)
    assert held.captions == [pairs.captions[i % len(pairs.captions)] for i in range(7)]
    train = readers.load_image_pairs(layout, embedded_store.manifest, "train", HOLDOUT)
    assert len(held.real_images) < len(train.images)


def test_with_an_upsampler_its_images_are_scored_against_bilinear_upsampling(
    ray_local, exports, embedded_store, tmp_path
):
    """The upsampled cascade's images are the pipeline's own, and the decoder's images under
    them, upsampled bilinearly, are the baseline the upsampler is judged against."""
    from unclip.datasets.clip import encode_images, load_clip
    from unclip.training.config import UpsamplerConfig
    from unclip.training.evaluation.cascade_generation import generate_chunk
    from unclip.training.models.upsampler import UpsamplerTask
    from unclip.training.sampling import load_pipeline

    clip_dir, prior_dir, decoder_dir = exports
    up_cfg = UpsamplerConfig(
        input_size=16, output_size=32, block_out_channels=[16, 32], timesteps=100, sample_steps=2
    )
    torch.manual_seed(0)
    task = UpsamplerTask(
        layout=embedded_store.layout,
        manifest_version=embedded_store.version,
        cfg=up_cfg,
        holdout_fraction=HOLDOUT,
        dim=TINY_CLIP.embed_dim,
        clip_id=load_clip(TINY_CLIP, clip_dir).clip_id,
    )
    up_dir = str(tmp_path / "upsampler")
    task.export(task.build_model(), up_dir)
    captions = ["a red circle", "a blue square", "a green triangle"]
    chunk = generate_chunk(
        captions, 3, TINY_CLIP, clip_dir, prior_dir, decoder_dir, 2, 1.0,
        {"upsampler_exports": [up_dir]}, None,
    )  # fmt: skip
    pipe = load_pipeline(decoder_dir, TINY_CLIP, clip_dir, prior_dir, [up_dir])
    options = {"decoder_num_inference_steps": 2, "decoder_guidance_scale": 1.0, "seed": 3}
    whole = pipe(captions, output_type="np", **options).images
    assert chunk["images"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(chunk["images"], whole)
    base = pipe(captions, output_type="np", upsample=False, **options).images
    assert base.shape == (3, 16, 16, 3)
    assert chunk["clip_bilinear"].shape == chunk["clip"].shape
    bilinear = Image.fromarray(base[0]).resize((32, 32), Image.Resampling.BILINEAR)
    bundle = load_clip(TINY_CLIP, clip_dir)
    # the baseline is the decoder's image upsampled, not the upsampler's output
    assert np.abs(chunk["clip_bilinear"][0] - encode_images(bundle, [bilinear])[0]).max() < 0.05
    assert np.abs(chunk["clip_bilinear"] - chunk["clip"]).max() > 0.05

    prior_fit, decoder_fit = _fits(exports, tmp_path, "decoder-eval-upsampled")
    cfg = EvaluateConfig(
        holdout_fraction=HOLDOUT, num_eval_samples=4, eval_steps=2, eval_workers=2, eval_seed=1
    )
    stages = {"upsampler_exports": [up_dir]}
    runs = CascadeRuns(prior_fit, decoder_fit, TINY_DECODER, TINY_CLIP, clip_dir, stages)
    m = evaluate_cascade(embedded_store.layout, embedded_store.version, runs, cfg)
    assert m["image_size"] == 32
    assert isinstance(m["fd_clip_bilinear"], float) and m["fd_clip_bilinear"] != m["fd_clip"]
    goal = m["goals"]["fd_clip_vs_bilinear"]
    assert goal["value"] == pytest.approx(m["fd_clip"] / m["fd_clip_bilinear"])
    assert goal["met"] == (m["fd_clip"] <= m["fd_clip_bilinear"])
    assert "fd_clip_bilinear" in m["protocols"]
