"""The diffusion decoder: shapes, loss, data from the manifest, sampling, export round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from training_helpers import DIM, TINY_DECODER, first_columns
from training_helpers import make_decoder_task as make_task

from unclip.training.config import DecoderConfig
from unclip.training.models.decoder import build_decoder, decoder_prediction
from unclip.training.models.decoder_sampler import load_decoder

TINY = TINY_DECODER


def test_unet_is_conditioned_on_the_image_embedding_kandinsky_style():
    model = build_decoder(TINY, DIM)
    assert model.config.addition_embed_type == "image"
    assert model.config.encoder_hid_dim_type == "image_proj" and model.config.encoder_hid_dim == DIM
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 50])
    emb = torch.randn(2, DIM)
    out = decoder_prediction(model, x, t, emb)
    assert out.shape == x.shape
    assert not torch.allclose(out, decoder_prediction(model, x, t, torch.zeros_like(emb)))


def test_bad_decoder_configs_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by attention_head_dim"):
        build_decoder(DecoderConfig(block_out_channels=[12, 32], attention_head_dim=8), DIM)
    with pytest.raises(ValueError, match="image_size"):
        build_decoder(DecoderConfig(image_size=18, block_out_channels=[16, 32, 32]), DIM)


def test_task_reads_images_joined_with_embeddings_and_computes_its_loss(embedded_store):
    task = make_task(layout=embedded_store.layout, version=embedded_store.version)
    source = task.data()
    n = sum(s.count for s in source.shards)
    assert 60 < n < embedded_store.manifest["num_samples"]  # the hold-out is left out
    batch = task.batch(first_columns(task, 4))
    assert batch["images"].shape == (4, 3, 16, 16) and batch["image_emb"].shape == (4, DIM)
    assert -1.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    model = task.build_model()
    loss, _ = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()


def test_sampling_export_and_load_round_trip(tmp_path):
    task = make_task()
    torch.manual_seed(0)
    task.export(task.build_model(), str(tmp_path))
    assert json.loads((tmp_path / "unclip_decoder.json").read_text())["image_size"] == 16
    UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet")
    sampler = load_decoder(str(tmp_path))
    emb = torch.randn(2, DIM)
    images = sampler.sample(emb, seed=1, guidance_scale=3.0)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, sampler.sample(emb, seed=1, guidance_scale=3.0))
    with pytest.raises(ValueError, match=f"\\[N, {DIM}\\]"):
        sampler.sample(torch.randn(2, DIM + 2))
    with pytest.raises(ValueError, match="guidance"):
        sampler.sample(emb, guidance_scale=-1.0)


TEXT = DecoderConfig(
    image_size=16,
    block_out_channels=[16, 32],
    attention_head_dim=8,
    timesteps=100,
    sample_steps=2,
    text_conditioning=True,
)


def test_caption_conditioning_kandinsky_21_style_and_its_separate_dropout(monkeypatch):
    model = build_decoder(TEXT, DIM)
    assert model.config.addition_embed_type == "text_image"
    assert model.config.encoder_hid_dim_type == "text_image_proj"
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 50])
    image, text = torch.randn(2, DIM), torch.randn(2, DIM)
    out = decoder_prediction(model, x, t, torch.cat([image, text], 1), with_text=True)
    assert out.shape == x.shape
    no_text = decoder_prediction(model, x, t, torch.cat([image, torch.zeros_like(text)], 1), True)
    assert not torch.allclose(out, no_text)  # the caption changes the prediction

    task = make_task()
    task.cfg = TEXT.model_copy(update={"cond_drop_prob": 0.1, "text_drop_prob": 0.5})
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    emb = rng.normal(size=(8, DIM)).astype(np.float32)
    with pytest.raises(ValueError, match="caption embeddings"):
        task.batch({"image": images, "image_embedding": emb})
    batch = task.batch({"image": images, "image_embedding": emb, "text_embedding": emb * 2})
    assert torch.equal(batch["text_emb"], batch["image_emb"] * 2)

    seen = []
    monkeypatch.setattr(
        "unclip.training.models.decoder.decoder_prediction",
        lambda m, x, t, c, *_: seen.append(c) or x * 0,
    )
    torch.manual_seed(0)
    for _ in range(200):
        task.loss(None, batch)
    cond = torch.cat(seen)  # [N, 2D]: image ‖ text
    image_dropped = (cond[:, :DIM] == 0).all(1).float().mean().item()
    text_dropped = (cond[:, DIM:] == 0).all(1).float().mean().item()
    assert 0.07 < image_dropped < 0.13 and 0.45 < text_dropped < 0.55


def test_text_conditioned_sampler_takes_captions_or_the_null_caption(tmp_path):
    task = make_task()
    task.cfg = TEXT
    torch.manual_seed(0)
    task.export(task.build_model(), str(tmp_path))
    sampler = load_decoder(str(tmp_path))
    assert sampler.text_conditioning
    emb, text = torch.randn(2, DIM), torch.randn(2, DIM)
    with_text = sampler.sample(emb, text_emb=text, seed=0, guidance_scale=2.0)
    without = sampler.sample(emb, seed=0, guidance_scale=2.0)
    assert with_text.shape == without.shape == (2, 16, 16, 3)
    assert not np.array_equal(with_text, without)
    with pytest.raises(ValueError, match="caption embeddings must be"):
        sampler.sample(emb, text_emb=torch.randn(2, DIM + 1))


def test_default_decoder_stays_image_only():
    assert not DecoderConfig().text_conditioning
    assert build_decoder(TINY, DIM).config.addition_embed_type == "image"


def test_vlb_term_is_zero_for_the_true_posterior_and_grows_with_a_wrong_variance():
    from unclip.training.diffusion import train_scheduler, vlb_term

    sched = train_scheduler(100, "epsilon", clip_sample=True)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 50, 99])
    x_t = sched.add_noise(x0, noise, t)
    exact = vlb_term(sched, x0, x_t, t, noise, -torch.ones_like(x0))  # v = −1: Σ = β̃_t
    assert torch.allclose(exact, torch.zeros(4), atol=1e-4)
    wrong = vlb_term(sched, x0, x_t, t, noise + 0.5, torch.ones_like(x0))
    assert (wrong > exact + 1e-3).all()
    at_zero = vlb_term(
        sched, x0, sched.add_noise(x0, noise, t * 0), t * 0, noise, -torch.ones_like(x0)
    )
    assert torch.isfinite(at_zero).all() and (at_zero > 0).all()  # −log p(x_0|x_1), bits/dim


def test_learned_variance_hybrid_loss_export_and_ddpm_sampling(tmp_path):
    task = make_task()
    task.cfg = TINY.model_copy(update={"learned_variance": True})
    model = task.build_model()
    assert model.config.out_channels == 6
    rng = np.random.default_rng(0)
    columns = {
        "image": rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8),
        "image_embedding": rng.normal(size=(4, DIM)).astype(np.float32),
    }
    loss, metrics = task.loss(model, task.batch(columns))
    assert torch.isfinite(loss) and metrics["loss_vlb"] > 0
    assert float(loss.detach()) == pytest.approx(
        metrics["loss_simple"] + 0.001 * metrics["loss_vlb"], rel=1e-4
    )
    loss.backward()
    task.export(model, str(tmp_path))
    sampler = load_decoder(str(tmp_path))
    assert sampler.scheduler_config["variance_type"] == "learned_range"
    emb = torch.randn(2, DIM)
    for kind in ("ddpm", "ddim"):
        images = sampler.sample(emb, steps=3, seed=0, guidance_scale=2.0, sampler=kind)
        assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8


class EngineLike(torch.nn.Module):
    """What the trainer hands to ``loss``: a wrapper whose ``config`` is not diffusers' (DeepSpeed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module, self.config = model, {"train_batch_size": 8}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize(
    "update",
    [
        {},
        {"text_conditioning": True},
        {"learned_variance": True},
        {"prediction_type": "sample", "snr_gamma": 5.0},
        {"prediction_type": "v_prediction"},
    ],
)
def test_loss_works_on_a_wrapped_model_as_under_the_trainer(update):
    task = make_task()
    task.cfg = TINY.model_copy(update=update)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4, DIM)).astype(np.float32)
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    batch = task.batch({"image": images, "image_embedding": emb, "text_embedding": emb})
    loss, _ = task.loss(EngineLike(task.build_model()), batch)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("prediction", ["sample", "v_prediction"])
def test_prediction_type_reaches_the_loss_the_export_and_the_sampler(prediction, tmp_path):
    """An x_0- or v-predicting decoder trains against that target and samples with it."""
    task = make_task()
    task.cfg = TINY.model_copy(update={"prediction_type": prediction, "snr_gamma": 5.0})
    assert task.train_scheduler().config.prediction_type == prediction
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(8, DIM)).astype(np.float32)
    batch = task.batch(
        {"image": rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8), "image_embedding": emb}
    )
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss, _ = task.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    task.export(model, str(tmp_path))
    info = json.loads((tmp_path / "unclip_decoder.json").read_text())
    assert info["prediction_type"] == prediction
    sampler = load_decoder(str(tmp_path))
    assert sampler.scheduler_config["prediction_type"] == prediction
    assert sampler.sample(torch.from_numpy(emb[:2]), steps=3).shape == (2, 16, 16, 3)


def test_learned_variance_needs_the_epsilon_parameterisation():
    with pytest.raises(ValueError, match="prediction_type 'epsilon'"):
        DecoderConfig(learned_variance=True, prediction_type="sample")


def test_objective_keys_keep_existing_run_names_at_their_defaults():
    base = DecoderConfig()
    assert not {"prediction_type", "snr_gamma", "adaptive_norm"} & set(base.identity())
    changed = DecoderConfig(prediction_type="sample", snr_gamma=5.0, adaptive_norm=True).identity()
    assert changed["prediction_type"] == "sample" and changed["snr_gamma"] == 5.0
    assert changed["adaptive_norm"] is True


def test_adaptive_norm_scales_and_shifts_every_block_by_the_condition_and_survives_export(tmp_path):
    from diffusers.models.resnet import ResnetBlock2D

    task = make_task()
    task.cfg = TINY.model_copy(update={"adaptive_norm": True})
    torch.manual_seed(0)
    model = task.build_model()
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    # each block's embedding projection gives a scale and a shift per channel, not one addend
    assert resnets and all(r.time_emb_proj.out_features == 2 * r.out_channels for r in resnets)
    x, t, emb = torch.randn(2, 3, 16, 16), torch.tensor([5, 60]), torch.randn(2, DIM)
    with torch.no_grad():
        out = decoder_prediction(model, x, t, emb)
        assert not torch.allclose(out, decoder_prediction(model, x, t, torch.zeros_like(emb)))
    task.export(model, str(tmp_path))
    loaded = load_decoder(str(tmp_path)).model  # the export's own loader, from the local folder
    assert loaded.config.resnet_time_scale_shift == "scale_shift"
    with torch.no_grad():
        torch.testing.assert_close(decoder_prediction(loaded, x, t, emb), out)
