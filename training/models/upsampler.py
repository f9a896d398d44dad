"""A super-resolution stage (low-res image → high-res image) on diffusers' UNet2DModel.

As in unCLIP's upsamplers (Ramesh et al. 2022, sec. 2.1 and app. C) and Imagen's (Saharia et
al. 2022, sec. 2.5): the low-res image is upsampled bilinearly to the output size and
concatenated to the noised high-res image as 3 extra input channels. In training the
conditioning is degraded so the stage learns to fix what the stage before it gets wrong:

1. x_lo = downsample(x_hi)                               (antialiased, input_size pixels)
2. x_lo ← x_lo ∗ G_σ,  σ ~ U[blur_sigma_min, blur_sigma_max]   (Gaussian blur, unCLIP)
3. c = bilinear_upsample(x_lo)                            (output_size pixels)
4. random crop of crop_size pixels of x_hi and the same window of c (optional)
5. c_s = √ᾱ_s · c + √(1-ᾱ_s) · ε',  s ~ U{0, …, noise_aug_max·T}   (noise augmentation,
   Imagen; s is given to the UNet as a second timestep, ``class_embed_type="timestep"``)

and the loss is the ε-prediction MSE (Ho et al. 2020, eq. 14) of the noised x_hi given c_s. When
sampling, the conditioning gets a fixed, small augmentation level ``sample_noise_aug``.

With ``residual``, the target is r = x_hi − c (c before noise augmentation), as in SRDiff (Li et
al. 2022), and sampling returns c + r̂: the stage only adds what bilinear upsampling misses, so a
barely trained one is close to bilinear rather than to noise.

The model is fully convolutional (no attention), so it trains on crops and samples whole images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from unclip.datasets.stream import Columns, ShardSource
from unclip.datasets.stream_sources import ImagePairSource

from ..config import UpsamplerConfig
from ..diffusion import Sampler, diffusion_mse, noised, sample_loop
from ..engine.fit_result import export_info_file
from .decoder import to_uint8, to_unit_range
from .diffusion_task import ExportedDiffusion, InfoValue, PixelDiffusionTask

MODEL_KIND = "upsampler"
INFO_FILE = export_info_file(MODEL_KIND)


def build_upsampler(cfg: UpsamplerConfig) -> UNet2DModel:
    """An untrained UNet: 6 input channels (noised high-res ‖ upsampled low-res), 3 out."""
    channels = list(cfg.block_out_channels)
    factor = 2 ** (len(channels) - 1)
    train_size = cfg.crop_size or cfg.output_size
    for name, size in (("output_size", cfg.output_size), ("crop_size", train_size)):
        if size % factor:
            raise ValueError(
                f"upsampler.{name} {size} must be divisible by 2^{len(channels) - 1} "
                f"({len(channels)} resolution levels of block_out_channels {channels})"
            )
    n = len(channels)
    return UNet2DModel(
        sample_size=cfg.output_size,
        in_channels=6,
        out_channels=3,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        block_out_channels=tuple(channels),
        layers_per_block=cfg.layers_per_block,
        add_attention=False,  # no attention in the mid block either: crops and whole images alike
        norm_num_groups=min(32, math.gcd(*channels)),
        class_embed_type="timestep",  # the noise-augmentation level s, embedded like t
    )


def upsampler_prediction(
    model: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, aug_level: torch.Tensor
) -> torch.Tensor:
    """The prediction (ε, x_0 or v) for noised high-res ``x_t`` given the upsampled conditioning."""
    return model(torch.cat([x_t, cond], dim=1), t, class_labels=aug_level).sample


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` [N, C, H, W] with its own σ (pixels); σ = 0 leaves it as is.

    G_σ(k) = exp(−k² / 2σ²) / Σ_j exp(−j² / 2σ²), k ∈ [−r, r], r = ⌈3·max σ⌉, applied separably
    with reflected borders.
    """
    n, c, h, w = x.shape
    r = max(1, math.ceil(3 * float(sigma.max())))
    k = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    s = sigma.to(x.dtype).clamp_min(1e-6).view(n, 1)
    kernel = torch.exp(-(k**2) / (2 * s**2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, 2r+1]; σ→0 gives a delta
    kernel = kernel.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased (area-weighted bilinear) resize to ``size`` pixels: the low-res view of x."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling of the low-res conditioning to the output size."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def augment(scheduler: Any, cond: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """c_s = √ᾱ_s · c + √(1-ᾱ_s) · ε'  (the forward process at level s; Imagen sec. 2.5)."""
    return scheduler.add_noise(cond, torch.randn_like(cond), level)


def random_crop(
    hi: torch.Tensor, cond: torch.Tensor, size: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size``-pixel window of each image and its conditioning.

    Windows start on multiples of ``step`` (the resolution ratio), so a crop covers whole
    low-res pixels.
    """
    n, _, h, w = hi.shape
    if size >= h:
        return hi, cond
    ys = torch.randint(0, (h - size) // step + 1, (n,)) * step
    xs = torch.randint(0, (w - size) // step + 1, (n,)) * step
    windows = [
        (slice(None), slice(int(y), int(y) + size), slice(int(x), int(x) + size))
        for y, x in zip(ys, xs, strict=True)
    ]
    return (
        torch.stack([hi[i][w] for i, w in enumerate(windows)]),
        torch.stack([cond[i][w] for i, w in enumerate(windows)]),
    )


def aug_timestep(fraction: float, timesteps: int) -> int:
    """The augmentation level s for a fraction of the T diffusion steps."""
    return min(timesteps - 1, int(round(fraction * timesteps)))


@dataclass(kw_only=True)
class UpsamplerTask(PixelDiffusionTask):
    """A super-resolution stage as a :class:`~unclip.training.engine.trainer.TrainTask`."""

    MODEL_KIND: ClassVar[str] = MODEL_KIND

    cfg: UpsamplerConfig

    def build_model(self) -> UNet2DModel:
        return build_upsampler(self.cfg)

    def stream_source(self, manifest: dict[str, Any]) -> ShardSource:
        return ImagePairSource(
            self.layout,
            manifest,
            "train",
            self.holdout_fraction,
            image_size=self.cfg.output_size,
            with_embeddings=False,
        )

    def batch(self, columns: Columns) -> torch.Tensor:
        images, size = columns["image"], self.cfg.output_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"upsampler images must be [N, {size}, {size}, 3], got {images.shape}")
        return to_unit_range(images)

    def conditioning(self, hi: torch.Tensor) -> torch.Tensor:
        """Steps 1–3: the degraded low-res view of ``hi``, upsampled back to the output size."""
        cfg = self.cfg
        lo = downsample(hi, cfg.input_size)
        if cfg.blur_sigma_max > 0:
            u = torch.rand(hi.shape[0])
            lo = gaussian_blur(
                lo, cfg.blur_sigma_min + u * (cfg.blur_sigma_max - cfg.blur_sigma_min)
            )
        return upsample(lo, cfg.output_size)

    def loss(self, model: Any, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, sched = self.cfg, self.train_scheduler()
        hi = batch
        cond = self.conditioning(hi)
        if cfg.crop_size is not None:
            step = cfg.output_size // math.gcd(cfg.output_size, cfg.input_size)
            hi, cond = random_crop(hi, cond, cfg.crop_size, step)
        top = aug_timestep(cfg.noise_aug_max, cfg.timesteps)
        level = torch.randint(0, top + 1, (hi.shape[0],), dtype=torch.long)
        target = hi - cond if cfg.residual else hi
        cond = augment(sched, cond, level)
        # L_simple = ‖ε − ε_θ(x_t, t, c_s, s)‖²  (Ho et al. 2020, eq. 14), or against x_0 or v
        x_t, noise, t = noised(sched, target)
        pred = upsampler_prediction(model, x_t, t, cond, level)
        return diffusion_mse(sched, pred, target, noise, t, cfg.snr_gamma), {}

    def export_info(self) -> dict[str, Any]:
        return {
            "input_size": self.cfg.input_size,
            "output_size": self.cfg.output_size,
            "sample_noise_aug": self.cfg.sample_noise_aug,
            "residual": self.cfg.residual,
        }


# Train (or resume, or skip when done) on a dataset version; export to ``run_dir/export``.
train_upsampler = UpsamplerTask.train


class UpsamplerSampler(ExportedDiffusion):
    """An exported upsampler, ready to turn low-res images into high-res ones."""

    TASK = UpsamplerTask
    MODEL_CLASS = UNet2DModel
    input_size = InfoValue(int)
    output_size = InfoValue(int)
    residual = InfoValue(bool, False)  # exports from before the option: the whole image

    @torch.no_grad()
    def sample(
        self,
        low_res: np.ndarray,
        steps: int | None = None,
        seed: int = 0,
        noise_aug: float | None = None,
        sampler: Sampler = "ddim",
    ) -> np.ndarray:
        """uint8 images [N, output_size, output_size, 3] for uint8 low-res images [N, in, in, 3]."""
        low_res = np.asarray(low_res)
        size = self.input_size
        if low_res.ndim != 4 or low_res.shape[1:] != (size, size, 3) or low_res.dtype != np.uint8:
            raise ValueError(
                f"upsampler input must be uint8 [N, {size}, {size}, 3], got "
                f"{low_res.dtype} {list(low_res.shape)}"
            )
        steps = self.sample_steps(steps)
        frac = float(noise_aug if noise_aug is not None else self.info.get("sample_noise_aug", 0.0))
        timesteps = int(self.scheduler_config["num_train_timesteps"])
        level = torch.full((len(low_res),), aug_timestep(frac, timesteps), dtype=torch.long)
        bilinear = upsample(to_unit_range(low_res), self.output_size)
        # c_s with the sampling level s; its noise comes from the seed too (reproducible).
        g = torch.Generator("cpu").manual_seed(int(seed) + 1)
        eps = torch.randn(bilinear.shape, generator=g)
        cond = DDPMScheduler.from_config(self.scheduler_config).add_noise(bilinear, eps, level)
        cond, level = cond.to(self.device, self.dtype), level.to(self.device)
        x = sample_loop(
            lambda x, t, c: upsampler_prediction(self.model, x, t, c, level),
            (len(low_res), 3, self.output_size, self.output_size),
            cond,
            self.scheduler_config,
            steps,
            1.0,  # no classifier-free guidance: the conditioning is never dropped
            seed,
            sampler,
        )
        if self.residual:
            x = bilinear.to(x.device, x.dtype) + x
        return to_uint8(x)


def load_upsampler(export_dir: str, device: str = "cpu") -> UpsamplerSampler:
    """Load an exported upsampler (``train_upsampler(...).export_dir``)."""
    return UpsamplerSampler.load(export_dir, device)
