"""The diffusion prior: shapes, loss, sampling, export round trip, and one fit under ZeRO-3."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import ray.cloudpickle
import torch
from diffusers import PriorTransformer
from tiny import tiny_trainer
from training_helpers import (
    DIM,
    HOLDOUT,
    TINY_PRIOR,
    add_empty_shard,
    build_embedded_store,
    embedding_columns,
    first_columns,
)
from training_helpers import make_prior_task as make_task

from unclip.datasets.storage import StorageLayout
from unclip.training.config import EvaluateConfig, PriorConfig
from unclip.training.engine.checkpoints import TRAINER_STATE, check_resumable
from unclip.training.engine.fit_result import FitResult
from unclip.training.evaluation.metric_names import PRIOR_METRICS_FILE
from unclip.training.evaluation.prior_eval import evaluate_prior
from unclip.training.models.prior import PriorTask, train_prior
from unclip.training.models.prior_model import build_prior, predict_x0
from unclip.training.models.prior_sampler import load_prior

TINY = TINY_PRIOR


def test_forward_and_loss_shapes():
    task = make_task()
    model = task.build_model()
    assert model.clip_std.requires_grad is False and model.clip_mean.requires_grad is False
    batch = task.batch(embedding_columns(6))
    assert batch["text"].shape == (6, DIM) and batch["image"].shape == (6, DIM)
    pred = predict_x0(model, batch["image"], torch.full((6,), 10), batch["text"])
    assert pred.shape == (6, DIM)
    loss, metrics = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.proj_in.weight.grad is not None and model.clip_mean.grad is None


def test_sampling_export_and_load_round_trip(tmp_path):
    task = make_task()
    torch.manual_seed(0)
    model = task.build_model().eval()
    task.export(model, str(tmp_path))
    info = json.loads((tmp_path / "unclip_prior.json").read_text())
    assert info["embedding_dim"] == DIM and info["sample_steps"] == TINY.sample_steps
    again = PriorTransformer.from_pretrained(str(tmp_path), subfolder="prior")
    assert torch.allclose(again.clip_std, model.clip_std)

    sampler = load_prior(str(tmp_path))
    text = torch.nn.functional.normalize(torch.randn(3, DIM), dim=-1)
    out = sampler.sample(text, seed=3)
    assert out.shape == (3, DIM)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.equal(out, sampler.sample(text, seed=3))
    best = sampler.sample(text, steps=3, guidance_scale=2.0, seed=3, candidates=4)
    assert best.shape == (3, DIM)
    # The kept candidate is the best of the k by dot product with the text.
    four = sampler.sample(text.repeat_interleave(4, 0), steps=3, guidance_scale=2.0, seed=3)
    dots = (four.view(3, 4, DIM) * text[:, None]).sum(-1)
    assert torch.allclose((best * text).sum(-1), dots.max(dim=1).values, atol=1e-5)


def test_bad_sampling_inputs_are_clear_errors(tmp_path):
    task = make_task()
    task.export(task.build_model(), str(tmp_path))
    sampler = load_prior(str(tmp_path))
    with pytest.raises(ValueError, match=f"\\[N, {DIM}\\]"):
        sampler.sample(torch.randn(2, DIM + 1))
    with pytest.raises(ValueError, match="guidance"):
        sampler.sample(torch.randn(2, DIM), guidance_scale=0.0)
    with pytest.raises(FileNotFoundError, match="not a prior export"):
        load_prior(str(tmp_path / "prior"))


def test_train_prior_under_zero3_then_evaluate(ray_local, embedded_store):
    cfg = TINY.model_copy(
        update={"trainer": tiny_trainer(zero_stage=3, max_steps=6, checkpoint_every=3)}
    )
    layout, version = embedded_store.layout, embedded_store.version
    fit = train_prior(layout, version, cfg, HOLDOUT)
    assert not fit.skipped and fit.run_name.startswith("prior-")
    assert os.path.isfile(os.path.join(fit.export_dir, "prior", "config.json"))
    assert np.isfinite(fit.metrics["loss"])
    # ZeRO-3 shards the weights: the export must hold the gathered, full tensors.
    model = PriorTransformer.from_pretrained(fit.export_dir, subfolder="prior")
    assert model.proj_in.weight.shape == (32, DIM)
    assert float(model.proj_in.weight.detach().abs().sum()) > 0
    stats_std = float(model.clip_std.min())
    assert stats_std > 0

    metrics = evaluate_prior(
        layout, version, fit, EvaluateConfig(holdout_fraction=HOLDOUT), HOLDOUT
    )
    keys = {"cos_pred_true", "cos_pred_text", "cos_pred_unrelated", "cos_text_baseline"}
    assert keys <= set(metrics) and all(-1 <= metrics[k] <= 1 for k in keys)
    # The fixture's image embeddings are 0.8 · text + noise: the baseline is about 0.8.
    assert metrics["cos_text_baseline"] == pytest.approx(0.8, abs=0.05)
    # Trained beats both baselines by a margin: the untrained prior of the same config and
    # seed (0.13 here), and an unrelated image (0.17); six steps reach about 0.37.
    untrained = PriorTask.from_manifest(layout, version, cfg, HOLDOUT)
    torch.manual_seed(cfg.trainer.seed)
    untrained.export(untrained.build_model(), str(layout.join("untrained-prior")))
    before = evaluate_prior(
        layout,
        version,
        FitResult("prior-untrained", "", layout.join("untrained-prior")),
        EvaluateConfig(holdout_fraction=HOLDOUT),
        HOLDOUT,
        out_path=layout.join("untrained-prior", PRIOR_METRICS_FILE),
    )
    assert metrics["cos_pred_true"] > before["cos_pred_true"] + 0.1
    assert metrics["cos_pred_true"] > metrics["cos_pred_unrelated"] + 0.1
    written = json.loads(
        open(os.path.join(layout.eval_dir(fit.run_name), PRIOR_METRICS_FILE)).read()
    )
    assert keys <= set(written)

    assert train_prior(layout, version, cfg, HOLDOUT).skipped


# --- bad input ------------------------------------------------------------------------------
def test_a_missing_dataset_version_is_a_clear_error_before_any_training(tmp_path):
    layout = StorageLayout(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset version 'feedfacefeedface'"):
        train_prior(layout, "feedfacefeedface", TINY, HOLDOUT)
    assert not os.path.exists(layout.runs_dir("prior"))


def test_an_empty_shard_is_skipped_and_an_empty_data_set_refused(tmp_path):
    store = add_empty_shard(build_embedded_store(str(tmp_path), num_pairs=40))
    assert [s["count"] for s in store.manifest["shards"]] == [40, 0]
    task = PriorTask.from_manifest(store.layout, store.version, TINY, HOLDOUT)
    source = task.data()
    assert [s.count for s in source.shards][1] == 0
    n = source.shards[0].count
    assert 0 < n < 40 and task.batch(first_columns(task, n))["image"].shape == (n, DIM)
    with pytest.raises(ValueError, match="dataset version 'v0' has no samples"):
        PriorTask.manifest_fields(
            store.layout, {**store.manifest, "version": "v0", "num_samples": 0}
        )
    nothing = PriorTask.from_manifest(store.layout, store.version, TINY, HOLDOUT)
    nothing.holdout_fraction = 0.999999  # every key hashes into the held-out split
    with pytest.raises(ValueError, match="hold no samples"):
        first_columns(nothing, 1)


# --- sampling: k candidates -------------------------------------------------------------------
def test_candidates_default_to_the_config_and_keep_the_best_dot_product(tmp_path):
    task = make_task()
    task.cfg = TINY.model_copy(update={"candidates": 4, "guidance_scale": 2.0, "sample_steps": 3})
    torch.manual_seed(0)
    task.export(task.build_model().eval(), str(tmp_path))
    sampler = load_prior(str(tmp_path))
    assert sampler.info["candidates"] == 4
    text = torch.nn.functional.normalize(torch.randn(5, DIM), dim=-1)
    best = sampler.sample(text, seed=3)  # k, steps and guidance from the export
    drawn = sampler.sample(text.repeat_interleave(4, 0), seed=3, candidates=1).view(5, 4, DIM)
    dots = (drawn * text[:, None]).sum(-1)
    assert torch.equal(best, drawn[torch.arange(5), dots.argmax(dim=1)])
    assert not torch.equal(best, drawn[:, 0])  # not merely the first draw
    one = sampler.sample(text, seed=3, candidates=1)
    assert not torch.equal(one, best)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        sampler.sample(text, candidates=0)


# --- fine-tuning from a diffusers-format prior ----------------------------------------------
def saved_prior(path, cfg=TINY, dim=DIM, seed=1) -> PriorTransformer:
    """A prior with random weights and statistics, written by ``save_pretrained`` to ``path``."""
    torch.manual_seed(seed)
    model = build_prior(cfg, dim, np.full(dim, 0.05), np.full(dim, 0.3))
    model.save_pretrained(str(path))
    return model


def with_init(path) -> PriorConfig:
    return TINY.model_copy(update={"init_from": str(path)})


def test_init_from_starts_from_the_weights_and_names_the_run_by_their_content(
    embedded_store, tmp_path
):
    layout, version = embedded_store.layout, embedded_store.version
    start = saved_prior(tmp_path / "diffusers")
    task = PriorTask.from_manifest(layout, version, with_init(tmp_path / "diffusers"), HOLDOUT)
    # What a Ray worker does: unpickle the task, build the model.
    model = ray.cloudpickle.loads(ray.cloudpickle.dumps(task)).build_model()
    for k, v in start.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.clip_std.requires_grad
    assert task.image_std == pytest.approx([0.3] * DIM)  # the start's normalization is kept
    assert task.describe()["init_weights"] == task.init_digest

    scratch = PriorTask.from_manifest(layout, version, TINY, HOLDOUT).run_name()
    assert task.run_name() != scratch
    # The content names the run, not the path; other weights are another run.
    shutil.copytree(tmp_path / "diffusers", tmp_path / "elsewhere")
    moved = PriorTask.from_manifest(layout, version, with_init(tmp_path / "elsewhere"), HOLDOUT)
    assert moved.run_name() == task.run_name()
    saved_prior(tmp_path / "other", seed=2)
    other = PriorTask.from_manifest(layout, version, with_init(tmp_path / "other"), HOLDOUT)
    assert other.run_name() not in (task.run_name(), scratch)

    # An unclip export (weights under prior/, its info beside them) is a starting point too.
    exporter = make_task(clip_id=embedded_store.manifest["clip_id"])
    exporter.export(start, str(tmp_path / "export"))
    again = PriorTask.from_manifest(layout, version, with_init(tmp_path / "export"), HOLDOUT)
    assert torch.equal(again.build_model().proj_in.weight, start.proj_in.weight)


def test_bad_init_from_is_a_clear_error_naming_the_key_and_the_path(embedded_store, tmp_path):
    layout, version = embedded_store.layout, embedded_store.version

    def start(path):
        return PriorTask.from_manifest(layout, version, with_init(path), HOLDOUT)

    with pytest.raises(FileNotFoundError, match=r"prior\.init_from: no such folder: .*missing"):
        start(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"prior\.init_from: .*empty holds no Prior"):
        start(tmp_path / "empty")
    saved_prior(tmp_path / "deeper", cfg=TINY.model_copy(update={"num_layers": 2}))
    with pytest.raises(ValueError, match=r"prior\.init_from: .*deeper.*num_layers is 2 there, 1"):
        start(tmp_path / "deeper")
    saved_prior(tmp_path / "narrow", dim=DIM // 2)
    with pytest.raises(ValueError, match=f"embedding_dim is {DIM // 2} there, {DIM} in the data"):
        start(tmp_path / "narrow")
    foreign = make_task(clip_id="anotherclip")
    foreign.export(foreign.build_model(), str(tmp_path / "foreign"))
    with pytest.raises(ValueError, match=r"prior\.init_from: .*foreign.*CLIP anotherclip"):
        start(tmp_path / "foreign")


def test_a_checkpoint_from_another_starting_point_is_refused(embedded_store, tmp_path):
    layout, version = embedded_store.layout, embedded_store.version
    saved_prior(tmp_path / "start")
    scratch = PriorTask.from_manifest(layout, version, TINY, HOLDOUT)
    tuned = PriorTask.from_manifest(layout, version, with_init(tmp_path / "start"), HOLDOUT)
    ckpt = tmp_path / "run" / "checkpoint_000000004"
    ckpt.mkdir(parents=True)
    state = {"step": 4, "task": json.loads(json.dumps(scratch.describe()))}
    (ckpt / TRAINER_STATE).write_text(json.dumps(state))
    check_resumable(str(tmp_path / "run"), scratch)
    with pytest.raises(ValueError, match="another model config"):
        check_resumable(str(tmp_path / "run"), tuned)


def test_a_fit_from_init_from_exports_the_starting_weights_after_a_tiny_step(
    ray_local, embedded_store, tmp_path
):
    start = saved_prior(tmp_path / "start")
    trainer = tiny_trainer(
        zero_stage=0, max_steps=1, checkpoint_every=1, lr=1e-9, warmup_steps=0, weight_decay=0
    )
    cfg = with_init(tmp_path / "start").model_copy(update={"trainer": trainer})
    layout, version = embedded_store.layout, embedded_store.version
    fit = train_prior(layout, version, cfg, HOLDOUT)
    assert fit.run_name == PriorTask.from_manifest(layout, version, cfg, HOLDOUT).run_name()
    tuned = PriorTransformer.from_pretrained(fit.export_dir, subfolder="prior")
    for k, v in start.state_dict().items():
        assert torch.allclose(tuned.state_dict()[k], v, atol=1e-6), k
