"""The diffusion decoder (CLIP image embedding → pixels) on diffusers' UNet2DConditionModel.

Conditioning as in Kandinsky 2.2, which is DALL·E 2's decoder conditioning: the image embedding
is projected and added to the timestep embedding (``addition_embed_type="image"``) and projected
to extra context tokens the cross-attention layers read (``encoder_hid_dim_type="image_proj"``).
Trained with the ε-prediction MSE (Ho et al. 2020, eq. 14) on the cosine schedule; the image
embedding is dropped (zeroed) with ``cond_drop_prob`` for classifier-free guidance.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from unclip.datasets import readers
from unclip.datasets.storage import StorageLayout

from .artifacts import local_dir
from .config import DecoderConfig
from .diffusion import Sampler, drop_condition, noised, sample_loop, train_scheduler
from .trainer import FitResult, TrainTask, fit, run_name_for

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
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=tuple(channels),
        layers_per_block=cfg.layers_per_block,
        # diffusers reads `attention_head_dim` as the number of heads per block (a known
        # misnomer): pass heads so each head really has cfg.attention_head_dim channels.
        attention_head_dim=tuple(c // cfg.attention_head_dim for c in channels),
        cross_attention_dim=channels[-1],
        norm_num_groups=min(32, math.gcd(*channels)),
        encoder_hid_dim=dim,
        encoder_hid_dim_type="image_proj",
        addition_embed_type="image",
    )


def predict_eps(
    model: Any, x_t: torch.Tensor, t: torch.Tensor, image_emb: torch.Tensor
) -> torch.Tensor:
    """The UNet's ε prediction for noised images ``x_t`` given image embeddings."""
    out = model(x_t, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": image_emb})
    return out.sample


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] → uint8 [N, H, W, 3]."""
    x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class DecoderTask(TrainTask):
    """The decoder as a :class:`~unclip.training.trainer.TrainTask` over one dataset version."""

    layout: StorageLayout
    manifest_version: str
    cfg: DecoderConfig
    holdout_fraction: float
    dim: int
    clip_id: str
    _data: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _sched: DDPMScheduler | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_manifest(
        cls, layout: StorageLayout, version: str, cfg: DecoderConfig, holdout_fraction: float
    ) -> DecoderTask:
        manifest = readers.load_manifest(layout, version)
        return cls(
            layout=layout,
            manifest_version=version,
            cfg=cfg,
            holdout_fraction=holdout_fraction,
            dim=int(manifest["embedding_dim"]),
            clip_id=str(manifest["clip_id"]),
        )

    def describe(self) -> dict[str, Any]:
        return {
            "model": MODEL_KIND,
            "decoder": self.cfg.model_dump(mode="json", exclude={"trainer"}),
            "data_version": self.manifest_version,
            "holdout_fraction": self.holdout_fraction,
        }

    def build_model(self) -> UNet2DConditionModel:
        return build_decoder(self.cfg, self.dim)

    def set_arrays(self, images: np.ndarray, image_emb: np.ndarray) -> int:
        """Use these uint8 [N, S, S, 3] images and their embeddings as training data."""
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"decoder images must be [N, {size}, {size}, 3], got {images.shape}")
        if image_emb.shape != (len(images), self.dim):
            raise ValueError(
                f"image embeddings must be [{len(images)}, {self.dim}], got {image_emb.shape}"
            )
        self._data = {"images": images, "image_emb": np.ascontiguousarray(image_emb, np.float32)}
        return len(images)

    def load_data(self, rank: int, world: int) -> int:
        manifest = readers.load_manifest(self.layout, self.manifest_version)
        pairs = readers.load_image_pairs(
            self.layout, manifest, "train", self.holdout_fraction, image_size=self.cfg.image_size
        )
        return self.set_arrays(pairs.images, pairs.image_emb)

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return {
            "images": to_unit_range(self._data["images"][indices]),
            "image_emb": torch.from_numpy(self._data["image_emb"][indices]),
        }

    def scheduler(self) -> DDPMScheduler:
        return train_scheduler(self.cfg.timesteps, "epsilon", clip_sample=True)

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # L_simple = ‖ε − ε_θ(x_t, t, z_i)‖²  (Ho et al. 2020, eq. 14), z_i dropped for CFG.
        if self._sched is None:
            self._sched = self.scheduler()
        x_t, noise, t = noised(self._sched, batch["images"])
        cond = drop_condition(batch["image_emb"], self.cfg.cond_drop_prob)
        pred = predict_eps(model, x_t, t, cond)
        return F.mse_loss(pred.float(), noise.float()), {}

    def export(self, model: torch.nn.Module, directory: str) -> None:
        model.save_pretrained(os.path.join(directory, "unet"))
        self.scheduler().save_pretrained(os.path.join(directory, "scheduler"))
        info = {
            "embedding_dim": self.dim,
            "image_size": self.cfg.image_size,
            "clip_id": self.clip_id,
            "data_version": self.manifest_version,
            "prediction_type": "epsilon",
            "sample_steps": self.cfg.sample_steps,
            "guidance_scale": self.cfg.guidance_scale,
        }
        with open(os.path.join(directory, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)


def train_decoder(
    layout: StorageLayout, manifest_version: str, cfg: DecoderConfig, holdout_fraction: float
) -> FitResult:
    """Train (or resume, or skip when done) the decoder on a dataset version; export to ``run_dir/export``."""
    task = DecoderTask.from_manifest(layout, manifest_version, cfg, holdout_fraction)
    name = run_name_for(
        MODEL_KIND, cfg, holdout_fraction, data_version=manifest_version, seed=cfg.trainer.seed
    )
    return fit(task, cfg.trainer, layout, MODEL_KIND, name)


class DecoderSampler:
    """An exported decoder, ready to turn image embeddings into pixels."""

    def __init__(
        self,
        model: UNet2DConditionModel,
        scheduler_config: dict[str, Any],
        info: dict[str, Any],
        device: str,
    ) -> None:
        self.model = model.to(device).eval()
        self.scheduler_config = dict(scheduler_config)
        self.info = info
        self.device = device
        self.dim = int(info["embedding_dim"])
        self.image_size = int(info["image_size"])

    @torch.no_grad()
    def sample(
        self,
        image_emb: torch.Tensor,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        sampler: Sampler = "ddim",
    ) -> np.ndarray:
        """uint8 images [N, H, W, 3] for image embeddings [N, D]."""
        emb = torch.as_tensor(image_emb, dtype=torch.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"image embeddings must be [N, {self.dim}], got {list(emb.shape)}")
        steps = int(steps if steps is not None else self.info.get("sample_steps", 50))
        scale = float(
            guidance_scale if guidance_scale is not None else self.info.get("guidance_scale", 1.0)
        )
        emb = emb.to(self.device)
        x = sample_loop(
            lambda x, t, c: predict_eps(self.model, x, t, c),
            (emb.shape[0], 3, self.image_size, self.image_size),
            emb,
            self.scheduler_config,
            steps,
            scale,
            seed,
            sampler,
        )
        return to_uint8(x)


def load_decoder(export_dir: str, device: str = "cpu") -> DecoderSampler:
    """Load an exported decoder (``train_decoder(...).export_dir``)."""
    with local_dir(export_dir) as d:
        info_path = os.path.join(d, INFO_FILE)
        if not os.path.isfile(info_path):
            raise FileNotFoundError(f"{export_dir} is not a decoder export (no {INFO_FILE})")
        with open(info_path) as f:
            info = json.load(f)
        model = UNet2DConditionModel.from_pretrained(
            os.path.join(d, "unet"), low_cpu_mem_usage=False
        )
        scheduler_config = dict(DDPMScheduler.load_config(os.path.join(d, "scheduler")))
    return DecoderSampler(model, scheduler_config, info, device)
