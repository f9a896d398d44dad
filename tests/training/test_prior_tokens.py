"""The prior with text-token encodings (``prior.text_tokens``): encodings, dropout, fit, sampling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import PriorTransformer
from tiny import TINY_CLIP, tiny_trainer
from training_helpers import HOLDOUT, TINY_PRIOR, build_clip_store, first_columns, make_decoder_task

from unclip.datasets.clip import build_bootstrap_clip, encode_texts, load_clip, save_clip
from unclip.datasets.clip_records import load_clip_of
from unclip.datasets.clip_text_tokens import TOKENS_PROJECTED, encode_text_tokens
from unclip.training.config import EvaluateConfig
from unclip.training.diffusion import drop_condition
from unclip.training.engine.runlog import read_rows
from unclip.training.evaluation.prior_eval import evaluate_prior
from unclip.training.models import caption_tokens
from unclip.training.models.caption_tokens import pack_condition, unpack_condition
from unclip.training.models.prior import PriorTask, train_prior
from unclip.training.models.prior_model import predict_x0
from unclip.training.models.prior_sampler import load_prior
from unclip.training.sampling import generate, load_pipeline

DIM = TINY_CLIP.embed_dim
CONTEXT = TINY_CLIP.context_length
TOKENS = TINY_PRIOR.model_copy(update={"text_tokens": True})
CAPTIONS = ["a red circle", "a small blue square above a green triangle", "a yellow circle"]


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    return build_clip_store(str(tmp_path_factory.mktemp("clipstore")), num_pairs=120)


def tokens_task(store, cfg=TOKENS) -> PriorTask:
    """A tokens prior task set up as on a worker (its CLIP loaded from the record)."""
    task = PriorTask.from_manifest(store.layout, store.version, cfg, HOLDOUT)
    task.setup(0, 1)
    return task


def captured_inputs(model: torch.nn.Module) -> list[dict]:
    """Every forward call's keyword arguments, recorded by a hook."""
    calls: list[dict] = []
    model.register_forward_pre_hook(
        lambda _m, _args, kwargs: calls.append({k: v.clone() for k, v in kwargs.items()}),
        with_kwargs=True,
    )
    return calls


def test_token_encodings_are_the_clip_text_transformers_last_hidden_states(clip_store):
    bundle = load_clip_of(clip_store.layout, clip_store.clip_id)  # found from its clip_id
    assert bundle.clip_id == clip_store.clip_id
    enc, mask, kind = encode_text_tokens(bundle, CAPTIONS)
    assert enc.shape == (3, CONTEXT, DIM) and mask.shape == (3, CONTEXT)
    # start and end tokens plus each word; padding is masked out
    tokens = bundle.tokenizer(CAPTIONS)
    assert mask.sum(1).tolist() == [5, 10, 5] == (tokens != 0).sum(1).tolist()
    # The tiny CLIP's text width (64) is not its embedding width (32): each token goes through
    # text_projection, so the end token's encoding is the un-normalized text embedding.
    assert kind == TOKENS_PROJECTED
    pooled = bundle.model.encode_text(tokens).detach().numpy()
    end = tokens.argmax(-1).numpy()
    np.testing.assert_allclose(enc[np.arange(3), end], pooled, atol=1e-5)


def test_each_batch_gets_its_own_captions_token_encodings(clip_store, monkeypatch):
    task = tokens_task(clip_store)
    assert task.text_context == CONTEXT
    model = task.build_model()
    assert model.config.num_embeddings == CONTEXT
    assert model.config.encoder_hid_proj_type == "linear"
    columns = first_columns(task, 6)
    batch = task.batch(columns)
    assert batch["tokens"].shape == (6, CONTEXT, DIM) and batch["token_mask"].dtype == torch.bool
    # the encodings of the rows' own captions (each distinct caption encoded once, then cached)
    bundle = load_clip_of(clip_store.layout, clip_store.clip_id)
    enc, mask, _ = encode_text_tokens(bundle, columns["caption"])
    torch.testing.assert_close(batch["tokens"], torch.from_numpy(enc), atol=1e-5, rtol=0)
    assert torch.equal(batch["token_mask"], torch.from_numpy(mask))
    assert set(task._token_cache) == set(columns["caption"])

    # With no room to cache, each batch is encoded afresh, to the same encodings.
    monkeypatch.setattr(caption_tokens, "TOKEN_TABLE_BYTES", 0)
    again = tokens_task(clip_store).batch(columns)
    torch.testing.assert_close(again["tokens"], batch["tokens"], atol=1e-5, rtol=0)
    assert torch.equal(again["token_mask"], batch["token_mask"])


def test_each_rank_serves_the_tokens_of_its_own_rows(clip_store):
    bundle = load_clip_of(clip_store.layout, clip_store.clip_id)
    for rank in (0, 1):
        task = tokens_task(clip_store)
        columns = first_columns(task, 4, rank=rank, world=2)
        batch = task.batch(columns)
        enc, mask, _ = encode_text_tokens(bundle, columns["caption"])
        torch.testing.assert_close(batch["tokens"], torch.from_numpy(enc), atol=1e-5, rtol=0)
        assert torch.equal(batch["token_mask"], torch.from_numpy(mask))
    with pytest.raises(ValueError, match="no CLIP is loaded"):
        PriorTask.from_manifest(clip_store.layout, clip_store.version, TOKENS, HOLDOUT).batch(
            columns
        )


def test_dropped_rows_lose_their_tokens_too(clip_store):
    task = tokens_task(clip_store, TOKENS.model_copy(update={"cond_drop_prob": 0.5}))
    batch = task.batch(first_columns(task, 16))
    cond = task.condition(batch)
    torch.manual_seed(0)
    dropped = drop_condition(cond, 0.5)
    text, tokens, mask = unpack_condition(dropped, CONTEXT, DIM)
    gone = (text == 0).all(dim=1)
    assert 0 < int(gone.sum()) < 16
    assert (tokens[gone] == 0).all() and not mask[gone].any()  # null tokens: none attended
    assert torch.equal(tokens[~gone], batch["tokens"][~gone])
    assert torch.equal(mask[~gone], batch["token_mask"][~gone])

    # What the model gets in the loss: the same rows lose text embedding and tokens together.
    model = task.build_model()
    calls = captured_inputs(model)
    torch.manual_seed(1)
    loss, _ = task.loss(model, batch)
    assert torch.isfinite(loss)
    seen = calls[-1]
    null = (seen["proj_embedding"] == 0).all(dim=1)
    assert 0 < int(null.sum()) < 16
    assert (seen["encoder_hidden_states"][null] == 0).all()
    assert not seen["attention_mask"][null].any()
    assert seen["attention_mask"][~null].any(dim=1).all()

    # Masked-out tokens do not reach the prediction: the null row ignores whatever they hold.
    x = torch.randn(2, DIM)
    t = torch.full((2,), 10)
    model.eval()
    with torch.no_grad():
        noisy = pack_condition(
            torch.zeros(2, DIM), torch.randn(2, CONTEXT, DIM), torch.zeros(2, CONTEXT)
        )
        a = predict_x0(model, x, t, torch.zeros_like(noisy))
        b = predict_x0(model, x, t, noisy)
    torch.testing.assert_close(a, b)


def test_guidance_gives_the_unconditional_half_null_tokens(clip_store, tmp_path):
    task = tokens_task(clip_store)
    task.export(task.build_model().eval(), str(tmp_path))
    sampler = load_prior(str(tmp_path))
    calls = captured_inputs(sampler.model)
    out = sampler.sample(captions=CAPTIONS[:2], steps=2, guidance_scale=3.0, seed=0)
    assert out.shape == (2, DIM)
    seen = calls[0]
    assert seen["encoder_hidden_states"].shape == (4, CONTEXT, DIM)
    cond, null = seen["attention_mask"].chunk(2)
    assert cond.any(dim=1).all() and not null.any()
    assert (seen["encoder_hidden_states"][2:] == 0).all() and (
        seen["proj_embedding"][2:] == 0
    ).all()


def test_a_text_tokens_prior_trains_exports_and_samples_from_captions(
    ray_local, clip_store, tmp_path
):
    trainer = tiny_trainer(zero_stage=1, max_steps=40, checkpoint_every=40, log_every=2, lr=1e-2)
    cfg = TOKENS.model_copy(update={"trainer": trainer, "sample_steps": 3})
    layout, version = clip_store.layout, clip_store.version
    fit = train_prior(layout, version, cfg, HOLDOUT)
    assert not fit.skipped
    losses = [r["loss"] for r in read_rows(os.path.join(fit.run_dir, "metrics.jsonl"))]
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:3]), losses

    # The export says it needs token encodings, and of which CLIP.
    info = json.load(open(os.path.join(fit.export_dir, "unclip_prior.json")))
    assert info["text_tokens"] is True and info["text_context_length"] == CONTEXT
    assert info["clip_id"] == clip_store.clip_id and info["clip_source"] == clip_store.clip_dir
    assert info["text_token_features"] == TOKENS_PROJECTED
    model = PriorTransformer.from_pretrained(fit.export_dir, subfolder="prior")
    assert model.config.num_embeddings == CONTEXT and model.encoder_hidden_states_proj is not None

    sampler = load_prior(fit.export_dir)  # finds the CLIP from the export's record
    out = sampler.sample(captions=CAPTIONS, seed=0)
    assert out.shape == (3, DIM)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    bundle = sampler.caption_clip()
    assert bundle.clip_id == clip_store.clip_id
    text = torch.from_numpy(encode_texts(bundle, CAPTIONS))
    assert torch.equal(out, sampler.sample(text, captions=CAPTIONS, seed=0))
    enc, mask, _ = encode_text_tokens(bundle, CAPTIONS)
    given = sampler.sample(
        text, seed=0, token_encodings=(torch.from_numpy(enc), torch.from_numpy(mask))
    )
    assert torch.equal(out, given)
    with pytest.raises(ValueError, match=r"text-token encodings \(prior\.text_tokens\).*captions="):
        sampler.sample(text)
    with pytest.raises(ValueError, match="one caption per text embedding"):
        sampler.sample(text, captions=CAPTIONS[:2])

    metrics = evaluate_prior(
        layout, version, fit, EvaluateConfig(holdout_fraction=HOLDOUT), HOLDOUT
    )
    assert -1 <= metrics["cos_pred_true"] <= 1

    # The cascade passes the captions: captions → CLIP → prior (with tokens) → decoder.
    decoder = make_decoder_task(dim=DIM, clip_id=clip_store.clip_id)
    decoder.export(decoder.build_model(), str(tmp_path / "decoder"))
    args = (TINY_CLIP, clip_store.clip_dir, fit.export_dir, str(tmp_path / "decoder"))
    assert len(generate(CAPTIONS[:2], *args, n_per_caption=2, decoder_num_inference_steps=2)) == 4
    pipe = load_pipeline(args[3], TINY_CLIP, clip_store.clip_dir, fit.export_dir)
    frames = pipe.interpolate(CAPTIONS[0], CAPTIONS[1], 2, decoder_num_inference_steps=2)
    assert len(frames.images) == 2

    assert train_prior(layout, version, cfg, HOLDOUT).skipped


def test_text_tokens_needs_the_clip_record_of_the_embeddings(embedded_store):
    # The fixture's embeddings were made by no real CLIP: nothing records one.
    with pytest.raises(FileNotFoundError, match=r"prior\.text_tokens: .*identity\.json"):
        PriorTask.from_manifest(embedded_store.layout, embedded_store.version, TOKENS, HOLDOUT)


def test_a_clip_given_to_the_sampler_must_be_the_exports(clip_store, tmp_path):
    task = tokens_task(clip_store)
    task.export(task.build_model().eval(), str(tmp_path))
    sampler = load_prior(str(tmp_path))
    other = TINY_CLIP.model_copy(update={"context_length": 8})
    torch.manual_seed(5)
    foreign = load_clip(other, save_clip(build_bootstrap_clip(other), other, str(tmp_path / "c")))
    with pytest.raises(ValueError, match=f"trained on embeddings of CLIP {clip_store.clip_id}"):
        sampler.use_clip(foreign)
