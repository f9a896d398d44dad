"""The diffusion decoder (CLIP image embedding → pixels) on diffusers' UNet2DConditionModel.

Conditioning as in Kandinsky 2.2, which is DALL·E 2's decoder conditioning: the image embedding
is projected and added to the timestep embedding (``addition_embed_type="image"``) and projected
to extra context tokens the cross-attention layers read (``encoder_hid_dim_type="image_proj"``).
Optionally (``text_conditioning``) the caption's CLIP text embedding joins it as in Kandinsky 2.1
(``addition_embed_type="text_image"``, ``encoder_hid_dim_type="text_image_proj"``): added to the
timestep embedding too, and one more context token. Trained with the MSE of the UNet's output
against ε (Ho et al. 2020, eq. 14; the default), x_0 or v (``prediction_type``), optionally
Min-SNR-γ weighted (``snr_gamma``), on the cosine schedule; the image embedding is dropped
(zeroed) with ``cond_drop_prob`` and the caption embedding, independently, with
``text_drop_prob`` (unCLIP sec. 2.1: 10% and 50%) for classifier-free guidance. With ``learned_variance`` the UNet also
outputs the interpolation v of its log-variance between β̃_t and β_t (diffusers'
``variance_type="learned_range"``), trained by the hybrid loss L_simple + λ·L_vlb (Nichol &
Dhariwal 2021, sec. 3.1).

The condition a model function receives is one tensor: the image embedding [N, D], or with text
conditioning [image ‖ text] [N, 2D], so the shared guidance's null condition (zeros) drops both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import Columns, ShardSource

from ..config import DecoderConfig
from ..diffusion import Sampler, diffusion_mse, drop_condition, noised, sample_loop
from ..engine.trainer import FitResult
from .diffusion_task import ExportedDiffusion, ManifestDiffusionTask

MODEL_KIND = "decoder"
INFO_FILE = "unclip_decoder.json"


def build_decoder(cfg: DecoderConfig, dim: int) -> UNet2DConditionModel:
    """An untrained UNet for ``cfg.image_size`` pixels, conditioned on D=``dim`` image embeddings."""
    channels = list(cfg.block_out_channels)
    bad = [c for c in channels if c % cfg.attention_head_dim]
    if bad:
        raise ValueError(
            f"decoder.block_out_channels {channels}: every entry must be divisible by "
            f"attention_head_dim={cfg.attention_head_dim}"
        )
    if cfg.image_size % 2 ** (len(channels) - 1):
        raise ValueError(
            f"decoder.image_size {cfg.image_size} must be divisible by 2^{len(channels) - 1} "
            f"({len(channels)} resolution levels)"
        )
    n = len(channels)
    if cfg.attention_levels > n:
        raise ValueError(
            f"decoder.attention_levels {cfg.attention_levels} exceeds the {n} resolution levels "
            f"of block_out_channels {channels}"
        )
    plain = n - cfg.attention_levels
    down = ("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * cfg.attention_levels
    if cfg.text_conditioning:
        # diffusers sizes Kandinsky 2.1's TextImageProjection / TextImageTimeEmbedding by
        # cross_attention_dim for the image and pooled-text inputs: both are CLIP embeddings here.
        conditioning = {
            "cross_attention_dim": dim,
            "encoder_hid_dim_type": "text_image_proj",
            "addition_embed_type": "text_image",
        }
    else:
        conditioning = {
            "cross_attention_dim": channels[-1],
            "encoder_hid_dim_type": "image_proj",
            "addition_embed_type": "image",
        }
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=6 if cfg.learned_variance else 3,  # ε ‖ v
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=tuple(channels),
        layers_per_block=cfg.layers_per_block,
        # diffusers reads `attention_head_dim` as the number of heads per block (a known
        # misnomer): pass heads so each head really has cfg.attention_head_dim channels.
        attention_head_dim=tuple(c // cfg.attention_head_dim for c in channels),
        norm_num_groups=min(32, math.gcd(*channels)),
        encoder_hid_dim=dim,
        **conditioning,
    )


def unet_output(
    model: Any, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, with_text: bool = False
) -> torch.Tensor:
    """The UNet's prediction (ε, x_0 or v) for noised images ``x_t`` given the condition.

    ``with_text``: the model is text-conditioned and ``cond`` is [image ‖ text] (passed in, not
    read from ``model.config``: under the trainer ``model`` is a DeepSpeed engine).
    """
    if not with_text:
        out = model(x_t, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": cond})
        return out.sample
    image_emb, text_emb = cond.chunk(2, dim=1)
    out = model(
        x_t,
        t,
        encoder_hidden_states=text_emb[:, None, :],  # one context token (the pooled caption)
        added_cond_kwargs={"image_embeds": image_emb, "text_embeds": text_emb},
    )
    return out.sample


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(μ₁, σ₁²) ‖ N(μ₂, σ₂²)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)) + 0.5 * (
        (mean1 - mean2) ** 2
    ) * torch.exp(-logvar2)


def discretized_gaussian_nll(
    x0: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """−log p(x_0 | x_1) per element for 8-bit data in [-1, 1] (Ho et al. 2020, eq. 13), nats."""

    def cdf(v: torch.Tensor) -> torch.Tensor:  # standard normal CDF
        return 0.5 * (1.0 + torch.erf(v / math.sqrt(2.0)))

    inv_std = torch.exp(-0.5 * logvar)
    centered = x0 - mean
    upper = cdf(inv_std * (centered + 1.0 / 255))
    lower = cdf(inv_std * (centered - 1.0 / 255))
    prob = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1.0 - lower, upper - lower))
    return -torch.log(prob.clamp_min(1e-12))


def vlb_term(
    scheduler: Any,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """L_t of the variational bound per sample, in bits per dimension (Nichol & Dhariwal 2021).

    1. x̂_0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                       (ε from the model, gradient stopped)
    2. μ(x_t, x) = √ᾱ_{t−1} β_t/(1−ᾱ_t) · x + √α_t (1−ᾱ_{t−1})/(1−ᾱ_t) · x_t   (Ho et al., eq. 7)
    3. log Σ_θ = (v+1)/2 · log β_t + (1 − (v+1)/2) · log β̃_t,  β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t
       (eq. 15; log β̃_0 clipped to log β̃_1, as the paper's code)
    4. L_t = KL(q(x_{t−1}|x_t, x_0) ‖ p_θ(x_{t−1}|x_t)) for t > 0, −log p_θ(x_0|x_1) at t = 0
    """
    ab = scheduler.alphas_cumprod.to(x0.device, torch.float32)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = 1.0 - ab / ab_prev
    post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))

    def at(a: torch.Tensor) -> torch.Tensor:
        return a[t].view(-1, 1, 1, 1)

    coef_x0 = at(ab_prev.sqrt() * betas / (1.0 - ab))
    coef_xt = at((1.0 - betas).sqrt() * (1.0 - ab_prev) / (1.0 - ab))
    true_mean = coef_x0 * x0 + coef_xt * x_t
    x0_hat = (x_t - at((1.0 - ab).sqrt()) * eps.detach()) / at(ab.sqrt())
    model_mean = coef_x0 * x0_hat + coef_xt * x_t
    frac = (v + 1.0) / 2.0
    model_logvar = frac * at(torch.log(betas)) + (1.0 - frac) * at(post_logvar)
    kl = normal_kl(true_mean, at(post_logvar), model_mean, model_logvar).mean(dim=(1, 2, 3))
    nll = discretized_gaussian_nll(x0, model_mean, model_logvar).mean(dim=(1, 2, 3))
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass(kw_only=True)
class DecoderTask(ManifestDiffusionTask):
    """The decoder as a :class:`~unclip.training.engine.trainer.TrainTask` over one dataset version."""

    MODEL_KIND: ClassVar[str] = MODEL_KIND
    SUBFOLDER: ClassVar[str] = "unet"
    INFO_FILE: ClassVar[str] = INFO_FILE
    PREDICTION: ClassVar[Literal["epsilon"]] = "epsilon"  # the default of cfg.prediction_type
    CLIP_SAMPLE: ClassVar[bool] = True

    cfg: DecoderConfig

    def build_model(self) -> UNet2DConditionModel:
        return build_decoder(self.cfg, self.dim)

    def stream_source(self, manifest: dict[str, Any]) -> ShardSource:
        from unclip.datasets.stream_sources import ImagePairSource

        return ImagePairSource(
            self.layout, manifest, "train", self.holdout_fraction, image_size=self.cfg.image_size
        )

    def batch(self, columns: Columns) -> dict[str, torch.Tensor]:
        images, image_emb = columns["image"], columns["image_embedding"]
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"decoder images must be [N, {size}, {size}, 3], got {images.shape}")
        if image_emb.shape != (len(images), self.dim):
            raise ValueError(
                f"image embeddings must be [{len(images)}, {self.dim}], got {image_emb.shape}"
            )
        out = {
            "images": to_unit_range(images),
            "image_emb": torch.from_numpy(np.ascontiguousarray(image_emb, np.float32)),
        }
        if self.cfg.text_conditioning:
            text_emb = columns.get("text_embedding")
            if text_emb is None or text_emb.shape != image_emb.shape:
                got = None if text_emb is None else text_emb.shape
                raise ValueError(
                    f"decoder.text_conditioning needs caption embeddings [{len(images)}, "
                    f"{self.dim}], got {got}"
                )
            out["text_emb"] = torch.from_numpy(np.ascontiguousarray(text_emb, np.float32))
        return out

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # L_simple = ‖ε − ε_θ(x_t, t, z_i, y)‖²  (Ho et al. 2020, eq. 14), or the same against
        # x_0 or v; z_i and the caption embedding y dropped independently for guidance.
        sched, x0 = self.train_scheduler(), batch["images"]
        x_t, noise, t = noised(sched, x0)
        cond = drop_condition(batch["image_emb"], self.cfg.cond_drop_prob)
        if self.cfg.text_conditioning:
            text = drop_condition(batch["text_emb"], self.cfg.text_drop_prob)
            cond = torch.cat([cond, text], dim=1)
        pred = unet_output(model, x_t, t, cond, self.cfg.text_conditioning).float()
        if not self.cfg.learned_variance:
            return diffusion_mse(sched, pred, x0, noise, t, self.cfg.snr_gamma), {}
        # L_hybrid = L_simple + λ · L_vlb  (Nichol & Dhariwal 2021, eq. 16); L_vlb only trains Σ_θ
        eps, v = pred.chunk(2, dim=1)  # the config allows learned variance with ε only
        simple = diffusion_mse(sched, eps, x0, noise, t, self.cfg.snr_gamma)
        vlb = vlb_term(sched, x0.float(), x_t.float(), t, eps, v)
        vlb = vlb.mean() * sched.config.num_train_timesteps
        loss = simple + self.cfg.vlb_weight * vlb
        return loss, {"loss_simple": float(simple.detach()), "loss_vlb": float(vlb.detach())}

    def scheduler(self) -> DDPMScheduler:
        sched = super().scheduler()
        if self.cfg.learned_variance:  # the export's DDPM sampler then uses Σ_θ
            sched = DDPMScheduler.from_config(sched.config, variance_type="learned_range")
        return sched

    def export_info(self) -> dict[str, Any]:
        return {
            "image_size": self.cfg.image_size,
            "text_conditioning": self.cfg.text_conditioning,
            "learned_variance": self.cfg.learned_variance,
        }


def train_decoder(
    layout: StorageLayout, manifest_version: str, cfg: DecoderConfig, holdout_fraction: float
) -> FitResult:
    """Train (or resume, or skip when done) the decoder on a dataset version; export to ``run_dir/export``."""
    return DecoderTask.train(layout, manifest_version, cfg, holdout_fraction)


class DecoderSampler(ExportedDiffusion):
    """An exported decoder, ready to turn image embeddings into pixels."""

    TASK = DecoderTask
    MODEL_CLASS = UNet2DConditionModel

    @property
    def image_size(self) -> int:
        return int(self.info["image_size"])

    @property
    def text_conditioning(self) -> bool:
        return bool(self.info.get("text_conditioning", False))

    @torch.no_grad()
    def sample(
        self,
        image_emb: torch.Tensor,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        sampler: Sampler = "ddim",
        text_emb: torch.Tensor | None = None,
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for image embeddings [N, D] (and caption embeddings [N, D]).

        A text-conditioned decoder given no caption embeddings decodes with the null caption.
        """
        emb = torch.as_tensor(image_emb, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"image embeddings must be [N, {self.dim}], got {list(emb.shape)}")
        if self.text_conditioning:
            text = torch.zeros_like(emb) if text_emb is None else torch.as_tensor(text_emb)
            if text.shape != emb.shape:
                raise ValueError(
                    f"caption embeddings must be {list(emb.shape)}, got {list(text.shape)}"
                )
            emb = torch.cat([emb, text.float()], dim=1)
        steps = int(steps if steps is not None else self.info.get("sample_steps", 50))
        scale = float(
            guidance_scale if guidance_scale is not None else self.info.get("guidance_scale", 1.0)
        )
        emb = emb.to(self.device)
        learned = bool(self.info.get("learned_variance", False))
        keep = 6 if learned and sampler == "ddpm" else 3  # DDIM (η = 0) has no use for Σ_θ
        x = sample_loop(
            lambda x, t, c: unet_output(self.model, x, t, c, self.text_conditioning)[:, :keep],
            (emb.shape[0], 3, self.image_size, self.image_size),
            emb,
            self.scheduler_config,
            steps,
            scale,
            seed,
            sampler,
            guided_channels=3 if keep == 6 else None,
        )
        return to_uint8(x)


def load_decoder(export_dir: str, device: str = "cpu") -> DecoderSampler:
    """Load an exported decoder (``train_decoder(...).export_dir``)."""
    return DecoderSampler.load(export_dir, device)
