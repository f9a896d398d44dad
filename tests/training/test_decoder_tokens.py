"""The decoder conditioned on caption tokens alone (``decoder.condition: text_tokens``, Imagen-style)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny import TINY_CLIP
from training_helpers import HOLDOUT, TINY_DECODER, build_clip_store, fit_decoder_killed_once

from unclip.datasets.clip import encode_texts
from unclip.datasets.clip_text_tokens import encode_text_tokens
from unclip.training.config import DecoderConfig
from unclip.training.models.caption_tokens import pack_condition
from unclip.training.models.decoder import DecoderTask, decoder_prediction
from unclip.training.models.decoder_sampler import load_decoder
from unclip.training.sampling import generate

DIM = TINY_CLIP.embed_dim
CONTEXT = TINY_CLIP.context_length
TOKENS = TINY_DECODER.model_copy(update={"condition": "text_tokens"})
CAPTIONS = ["a red circle", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    return build_clip_store(str(tmp_path_factory.mktemp("clipstore")), num_pairs=120)


def tokens_task(store, cfg: DecoderConfig = TOKENS) -> DecoderTask:
    """A tokens decoder task set up as on a worker (its CLIP loaded from the record)."""
    task = DecoderTask.from_manifest(store.layout, store.version, cfg, HOLDOUT)
    task.setup(0, 1)
    return task


def test_the_unet_reads_the_token_sequence_by_cross_attention_and_the_pooled_text(clip_store):
    task = tokens_task(clip_store)
    model = task.build_model().eval()
    assert model.config.encoder_hid_dim_type == "text_proj"
    assert model.config.encoder_hid_dim == DIM and model.config.class_embed_type == "projection"
    assert model.config.addition_embed_type is None  # no image embedding anywhere
    enc, mask = task.token_encodings(CAPTIONS)
    assert enc.shape == (2, CONTEXT, DIM) and mask.shape == (2, CONTEXT)
    text = torch.randn(2, DIM)
    cond = pack_condition(text, torch.from_numpy(enc), torch.from_numpy(mask))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 60])
    with torch.no_grad():
        out = decoder_prediction(model, x, t, cond, text_context=CONTEXT)
        assert out.shape == x.shape
        # Each part of the condition reaches the output: the tokens and the pooled embedding.
        other_tokens = pack_condition(
            text, torch.from_numpy(enc[::-1].copy()), torch.ones(2, CONTEXT)
        )
        other_text = pack_condition(
            torch.randn(2, DIM), torch.from_numpy(enc), torch.from_numpy(mask)
        )
        assert not torch.allclose(
            out, decoder_prediction(model, x, t, other_tokens, text_context=CONTEXT)
        )
        assert not torch.allclose(
            out, decoder_prediction(model, x, t, other_text, text_context=CONTEXT)
        )


def test_batches_carry_each_captions_tokens_and_dropout_drops_them_whole(clip_store, monkeypatch):
    task = tokens_task(clip_store)
    columns = {
        "image": np.zeros((2, 16, 16, 3), np.uint8),
        "image_embedding": np.zeros((2, DIM), np.float32),
        "text_embedding": np.ones((2, DIM), np.float32),
        "caption": CAPTIONS,
    }
    batch = task.batch(columns)
    enc, mask, _ = encode_text_tokens(task._clip, CAPTIONS)
    assert np.array_equal(batch["tokens"].numpy(), enc)
    assert np.array_equal(batch["token_mask"].numpy(), mask)
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.tensor([0.0, 1.0])[:n])
    cond = task.condition(batch)
    assert (cond[0] == 0).all()  # dropped: no text, no tokens, empty mask
    width = DIM + CONTEXT * DIM + CONTEXT
    assert cond.shape == (2, width) and cond[1, :DIM].eq(1).all() and cond[1, -CONTEXT:].any()
    with pytest.raises(ValueError, match="caption embeddings"):
        task.batch({k: v for k, v in columns.items() if k != "text_embedding"})


def test_text_tokens_and_caption_embedding_conditioning_are_one_or_the_other():
    with pytest.raises(ValueError, match="text_conditioning.*set one"):
        DecoderConfig(condition="text_tokens", text_conditioning=True)


def test_trains_resumes_after_a_killed_worker_exports_and_samples_from_captions(
    ray_local, clip_store, tmp_path
):
    result, losses = fit_decoder_killed_once(clip_store, TOKENS, str(tmp_path), "tokens-killed")
    assert np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:2]), losses

    info = json.load(open(os.path.join(result.export_dir, "unclip_decoder.json")))
    assert info["condition"] == "text_tokens" and info["text_context_length"] == CONTEXT
    assert info["clip_id"] == clip_store.clip_id and info["clip_source"] == clip_store.clip_dir
    sampler = load_decoder(result.export_dir)  # finds the CLIP from the export's record
    images = sampler.sample(None, captions=CAPTIONS, seed=0, steps=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    bundle = sampler.caption_clip()
    text = torch.from_numpy(encode_texts(bundle, CAPTIONS))
    enc, mask, _ = encode_text_tokens(bundle, CAPTIONS)
    given = sampler.sample(
        None,
        text_emb=text,
        token_encodings=(torch.from_numpy(enc), torch.from_numpy(mask)),
        seed=0,
        steps=2,
    )
    assert np.array_equal(images, given)
    with pytest.raises(ValueError, match="conditioned on captions' tokens"):
        sampler.sample(torch.randn(2, DIM))

    # The cascade needs no prior for it: captions → CLIP tokens → decoder.
    out = generate(
        CAPTIONS,
        TINY_CLIP,
        clip_store.clip_dir,
        None,
        result.export_dir,
        n_per_caption=2,
        decoder_num_inference_steps=2,
    )
    assert len(out) == 4 and out[0].size == (16, 16)
