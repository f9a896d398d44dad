"""The decoder with its own text transformer (``decoder.condition: caption_transformer``, GLIDE)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from tiny import TINY_CLIP
from training_helpers import HOLDOUT, TINY_DECODER, build_clip_store, fit_decoder_killed_once

from unclip.datasets.clip import load_clip
from unclip.training.config import DecoderConfig
from unclip.training.inference import UnclipPipeline
from unclip.training.models.caption_transformer import (
    CaptionTransformer,
    caption_ids,
    pack_caption_ids,
    unpack_caption_ids,
)
from unclip.training.models.decoder import DecoderTask, decoder_prediction
from unclip.training.models.decoder_sampler import load_decoder
from unclip.training.sampling import generate

CONTEXT = 12
GLIDE = TINY_DECODER.model_copy(
    update={
        "condition": "caption_transformer",
        "text_encoder_width": 32,
        "text_encoder_layers": 1,
        "text_encoder_heads": 2,
        "text_encoder_context": CONTEXT,
    }
)
CAPTIONS = ["a red circle above a blue square", "a blue circle above a red square"]


def glide_task(cfg: DecoderConfig = GLIDE) -> DecoderTask:
    return DecoderTask(
        layout=None, manifest_version="v0", cfg=cfg, holdout_fraction=HOLDOUT, dim=8, clip_id="c"
    )


def test_caption_ids_run_from_start_to_end_of_text_and_long_captions_are_cut():
    ids, mask = caption_ids(["a red circle", "", "one two three " * 10], CONTEXT)
    assert ids.dtype == torch.long and ids.shape == mask.shape == (3, CONTEXT)
    assert mask.sum(1).tolist() == [5, 2, CONTEXT]  # SOT a red circle EOT; SOT EOT; all of it
    assert ids[0, 0] == 49406 and ids[0, 4] == 49407 and (ids[0, 5:] == 0).all()
    assert ids[2, -1] == 49407  # cut, still ended
    assert torch.equal(unpack_caption_ids(pack_caption_ids(ids, mask))[0], ids)
    with pytest.raises(ValueError, match="integer"):
        unpack_caption_ids(pack_caption_ids(ids, mask).float())
    with pytest.raises(TypeError, match="list of strings"):
        caption_ids("a red circle", CONTEXT)


def test_the_encoder_reads_word_order_ignores_padding_and_zeroes_a_dropped_row():
    torch.manual_seed(0)
    enc = CaptionTransformer(context_length=CONTEXT, width=32, layers=1, heads=2).eval()
    ids, mask = caption_ids(CAPTIONS, CONTEXT)
    with torch.no_grad():
        states, pooled = enc(ids, mask)
        assert states.shape == (2, CONTEXT, 32) and pooled.shape == (2, 32)
        # the same words in another order: another condition
        assert not torch.allclose(pooled[0], pooled[1], atol=1e-4)
        # what lies past end-of-text is not read
        junk = ids.clone()
        junk[~mask] = 999
        states2, pooled2 = enc(junk, mask)
        assert torch.allclose(pooled2, pooled, atol=1e-5)
        assert torch.allclose(states2[mask], states[mask], atol=1e-5)
        # the pooled state is the mean over the caption's slots, padding left out
        for i in range(2):
            assert torch.allclose(pooled[i], states[i][mask[i]].mean(0), atol=1e-6)
        # a dropped row (all zeros) gives zeros, no NaN
        null_states, null_pooled = enc(torch.zeros_like(ids), torch.zeros_like(mask))
        assert (null_states == 0).all() and (null_pooled == 0).all()


def test_the_unet_and_its_text_encoder_train_as_one_and_dropout_drops_whole_rows(monkeypatch):
    task = glide_task()
    model = task.build_model()
    assert model.unet.config.encoder_hid_dim == 32  # the caption transformer's width
    assert model.unet.config.class_embed_type == "projection"
    batch = task.batch(
        {
            "image": np.zeros((2, 16, 16, 3), np.uint8),
            "image_embedding": np.zeros((2, 8), np.float32),
            "caption": CAPTIONS,
        }
    )
    ids, mask = caption_ids(CAPTIONS, CONTEXT)
    assert torch.equal(batch["caption_ids"], ids) and torch.equal(batch["caption_mask"], mask)
    assert "image_emb" not in batch  # captions alone
    monkeypatch.setattr(torch, "rand", lambda n, **kw: torch.tensor([0.0, 1.0])[:n])
    cond = task.condition(batch)
    assert cond.dtype == torch.long and (cond[0] == 0).all()
    assert torch.equal(cond[1], pack_caption_ids(ids, mask)[1])
    monkeypatch.undo()

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 60])
    out = decoder_prediction(model, x, t, pack_caption_ids(ids, mask))
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    grad = model.text_encoder.token_embedding.weight.grad
    used = torch.unique(ids[mask])
    assert grad[used].abs().sum(1).gt(0).all()  # the pixel loss reaches the caption's tokens
    unused = torch.ones(len(grad), dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0


def test_caption_transformer_options_are_checked():
    with pytest.raises(ValueError, match="text_conditioning.*set one"):
        DecoderConfig(condition="caption_transformer", text_conditioning=True)
    with pytest.raises(ValueError, match="divide by text_encoder_heads"):
        DecoderConfig(condition="caption_transformer", text_encoder_width=30, text_encoder_heads=4)


@pytest.fixture(scope="module")
def clip_store(tmp_path_factory):
    return build_clip_store(str(tmp_path_factory.mktemp("clipstore")), num_pairs=120)


def test_trains_resumes_after_a_killed_worker_exports_and_samples_without_a_prior(
    ray_local, clip_store, tmp_path
):
    result, losses = fit_decoder_killed_once(clip_store, GLIDE, str(tmp_path), "glide-killed")
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:2]), losses

    info = json.load(open(os.path.join(result.export_dir, "unclip_decoder.json")))
    assert info["condition"] == "caption_transformer" and info["text_encoder"] == "text_encoder"
    assert os.path.isdir(os.path.join(result.export_dir, "text_encoder"))
    sampler = load_decoder(result.export_dir)
    assert sampler.reads_captions and sampler.text_encoder.config.context_length == CONTEXT
    images = sampler.sample(None, captions=CAPTIONS, seed=0, steps=2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    # the trained text encoder is the one sampled with: another one draws other images
    other = load_decoder(result.export_dir)
    torch.manual_seed(1)
    other.text_encoder = CaptionTransformer(**other.text_encoder.config).eval()
    assert not np.array_equal(images, other.sample(None, captions=CAPTIONS, seed=0, steps=2))
    with pytest.raises(ValueError, match="own text encoder: pass captions"):
        sampler.sample(torch.randn(2, 8))

    # The cascade and the diffusers pipeline need no prior; the pipeline saves and loads whole.
    clip_dir, export = clip_store.clip_dir, result.export_dir
    out = generate(CAPTIONS, TINY_CLIP, clip_dir, None, export, decoder_num_inference_steps=2)
    assert np.array_equal(np.stack([np.asarray(im) for im in out]), images)
    pipe = UnclipPipeline.from_exports(result.export_dir, load_clip(TINY_CLIP, clip_store.clip_dir))
    saved = str(tmp_path / "pipe")
    pipe.save_pretrained(saved)
    index = json.load(open(os.path.join(saved, "model_index.json")))
    assert index["text_encoder"] == [
        "unclip.training.models.caption_transformer",
        "CaptionTransformer",
    ]
    again = UnclipPipeline.from_pretrained(saved)
    drawn = again(CAPTIONS, decoder_num_inference_steps=2, output_type="np").images
    assert np.array_equal(drawn, images)
