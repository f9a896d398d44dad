"""The super-resolution stage: degradations, crops, loss, data from the manifest, sampling, export,
training through the one trainer, and the cascade's size check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from pydantic import ValidationError
from tiny import tiny_trainer
from training_helpers import DIM, HOLDOUT, TINY_DECODER, make_decoder_task

from unclip.datasets.storage import StorageLayout
from unclip.training.config import UpsamplerConfig
from unclip.training.models.decoder_sampler import load_decoder
from unclip.training.models.upsampler import (
    UpsamplerTask,
    aug_timestep,
    build_upsampler,
    downsample,
    gaussian_blur,
    load_upsampler,
    random_crop,
    train_upsampler,
    upsample,
    upsampler_prediction,
)
from unclip.training.sampling import check_cascade

TINY = UpsamplerConfig(
    input_size=8,
    output_size=16,
    block_out_channels=[16, 32],
    timesteps=100,
    crop_size=8,
    sample_steps=3,
)


def make_task(cfg: UpsamplerConfig = TINY, layout=None, version="v0") -> UpsamplerTask:
    return UpsamplerTask(
        layout=layout or StorageLayout("/nonexistent"),
        manifest_version=version,
        cfg=cfg,
        holdout_fraction=HOLDOUT,
        dim=DIM,
        clip_id="clip0",
    )


def test_unet_takes_the_upsampled_low_res_image_and_the_noise_aug_level():
    model = build_upsampler(TINY)
    assert model.config.in_channels == 6 and model.config.class_embed_type == "timestep"
    x, cond = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 50])
    out = upsampler_prediction(model, x, t, cond, torch.tensor([0, 0]))
    assert out.shape == x.shape
    assert not torch.allclose(out, upsampler_prediction(model, x, t, cond, torch.tensor([20, 20])))
    assert not torch.allclose(out, upsampler_prediction(model, x, t, torch.zeros_like(cond), t * 0))
    # fully convolutional: samples whole images of a size it was never cropped to
    assert upsampler_prediction(
        model, torch.randn(1, 3, 32, 32), t[:1], torch.randn(1, 3, 32, 32), t[:1] * 0
    ).shape == (1, 3, 32, 32)


def test_gaussian_blur_per_image_sigma():
    x = torch.zeros(2, 3, 9, 9)
    x[:, :, 4, 4] = 1.0
    y = gaussian_blur(x, torch.tensor([0.0, 1.0]))
    assert torch.allclose(y[0], x[0])  # σ = 0: unchanged
    assert y[1].sum().item() == pytest.approx(3.0, abs=1e-4)  # mass kept per channel
    assert y[1, 0, 4, 4] < 0.2 and y[1, 0, 4, 5] > 0.05  # spread to the neighbours
    assert torch.allclose(y[1, 0], y[1, 0].T)  # isotropic


def test_crops_take_the_same_window_of_image_and_conditioning():
    torch.manual_seed(0)
    hi = torch.arange(4 * 3 * 16 * 16, dtype=torch.float32).view(4, 3, 16, 16)
    a, b = random_crop(hi, hi.clone() * 2, 8, 2)
    assert a.shape == (4, 3, 8, 8) and torch.equal(b, a * 2)
    starts = (a[:, 0, 0, 0] % (16 * 16)).long()
    assert all(int(s) // 16 % 2 == 0 and int(s) % 16 % 2 == 0 for s in starts)


def test_config_rejects_sizes_that_cannot_work():
    with pytest.raises(ValidationError, match="larger than input_size"):
        UpsamplerConfig(input_size=64, output_size=32)
    with pytest.raises(ValidationError, match="crop_size"):
        UpsamplerConfig(input_size=32, output_size=64, crop_size=33)
    with pytest.raises(ValidationError, match="blur_sigma_max"):
        UpsamplerConfig(blur_sigma_min=1.0, blur_sigma_max=0.5)
    with pytest.raises(ValueError, match="divisible by 2\\^2"):
        build_upsampler(UpsamplerConfig(input_size=8, output_size=16, crop_size=6))


def test_loss_on_degraded_crops_and_its_gradient():
    task = make_task()
    rng = np.random.default_rng(0)
    batch = task.batch({"image": rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)})
    assert batch.shape == (4, 3, 16, 16)
    cond = task.conditioning(batch)
    assert cond.shape == batch.shape
    # the conditioning is a blurred low-res view: smoother than the image, close on average
    assert cond.diff(dim=-1).abs().mean() < batch.diff(dim=-1).abs().mean()
    assert torch.allclose(downsample(cond, 8).mean(), downsample(batch, 8).mean(), atol=0.05)
    model = task.build_model()
    loss, _ = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.conv_in.weight.grad[:, 3:].abs().sum() > 0  # the conditioning channels learn
    with pytest.raises(ValueError, match="\\[N, 16, 16, 3\\]"):
        task.batch({"image": np.zeros((2, 8, 8, 3), np.uint8)})
    assert aug_timestep(0.2, 100) == 20 and aug_timestep(0.999, 100) == 99


def test_export_load_and_sample(tmp_path):
    task = make_task()
    torch.manual_seed(0)
    task.export(task.build_model(), str(tmp_path))
    info = json.loads((tmp_path / "unclip_upsampler.json").read_text())
    assert info["input_size"] == 8 and info["output_size"] == 16
    UNet2DModel.from_pretrained(str(tmp_path), subfolder="unet")
    sampler = load_upsampler(str(tmp_path))
    low = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = sampler.sample(low, steps=2, seed=3)
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert np.array_equal(out, sampler.sample(low, steps=2, seed=3))
    with pytest.raises(ValueError, match="uint8 \\[N, 8, 8, 3\\]"):
        sampler.sample(np.zeros((1, 16, 16, 3), np.uint8))


def test_a_residual_stage_learns_and_adds_back_what_bilinear_upsampling_misses(tmp_path):
    """With ``residual``, the target is the image minus its bilinear conditioning, and sampling
    adds the bilinear image back: a stage that predicts x_0 = 0 returns bilinear upsampling."""
    cfg = TINY.model_copy(update={"prediction_type": "sample", "noise_aug_max": 0.0})
    flat = np.broadcast_to(np.array([200, 40, 90], np.uint8), (2, 16, 16, 3)).copy()
    zero = build_upsampler(cfg)
    for p in zero.conv_out.parameters():
        torch.nn.init.zeros_(p)  # predicts x_0 = 0 everywhere
    plain, residual = make_task(cfg), make_task(cfg.model_copy(update={"residual": True}))
    batch = plain.batch({"image": flat})
    # a flat image is its own bilinear upsampling: nothing is left for a residual stage to learn
    assert residual.loss(zero, batch)[0].item() == pytest.approx(0.0, abs=1e-10)
    assert plain.loss(zero, batch)[0].item() > 0.05
    low = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    bilinear = upsample(torch.from_numpy(low).permute(0, 3, 1, 2).float() / 127.5 - 1, 16)
    bilinear = ((bilinear.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    for task, expected in ((residual, bilinear), (plain, np.full_like(bilinear, 128))):
        out_dir = tmp_path / str(task.cfg.residual)
        task.export(zero, str(out_dir))
        out = load_upsampler(str(out_dir)).sample(low, steps=2, seed=0, noise_aug=0.0)
        assert np.abs(out.astype(float) - expected).max() <= 1.0


def test_cascade_refuses_an_upsampler_of_another_input_size(tmp_path):
    decoder = make_decoder_task()  # 16 px
    decoder.export(decoder.build_model(), str(tmp_path / "decoder"))
    make_task().export(build_upsampler(TINY), str(tmp_path / "up8"))
    fits = UpsamplerConfig(input_size=16, output_size=32, block_out_channels=[16, 32])
    make_task(fits).export(build_upsampler(fits), str(tmp_path / "up16"))
    dec = load_decoder(str(tmp_path / "decoder"))
    with pytest.raises(ValueError, match="takes 8 px images but the decoder makes 16 px"):
        check_cascade(dec, [load_upsampler(str(tmp_path / "up8"))])
    up16 = load_upsampler(str(tmp_path / "up16"))
    check_cascade(dec, [up16])
    assert up16.output_size == 32 and dec.image_size == TINY_DECODER.image_size
    with pytest.raises(ValueError, match="upsampler 2 takes 8 px images but upsampler 1 makes 32"):
        check_cascade(dec, [up16, load_upsampler(str(tmp_path / "up8"))])


def test_trains_through_the_one_trainer_on_the_manifest_images(embedded_store, ray_local):
    cfg = TINY.model_copy(update={"trainer": tiny_trainer(max_steps=4, checkpoint_every=4)})
    fit = train_upsampler(embedded_store.layout, embedded_store.version, cfg, HOLDOUT)
    assert "upsampler" in fit.run_dir and not fit.skipped
    sampler = load_upsampler(fit.export_dir)
    assert sampler.output_size == 16
    again = train_upsampler(embedded_store.layout, embedded_store.version, cfg, HOLDOUT)
    assert again.skipped and again.run_name == fit.run_name
