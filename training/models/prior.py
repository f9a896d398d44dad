"""The DALL·E 2 diffusion prior (CLIP text embedding → CLIP image embedding) as a training task.

Trained with the MSE of the predicted clean image embedding x_0 (Ramesh et al. 2022, sec. 2.2)
on the network of :mod:`.prior_model`. With ``prior.text_tokens`` the caption's per-token
encodings join the condition, as in Karlo: the frozen CLIP text transformer's last hidden
states (after ln_final, before pooling; through CLIP's text_projection when the text width is
not the embedding width), computed on the training workers from the captions with the CLIP the
embeddings were made with.

Image embeddings are normalized by the data set's mean and std; the model keeps them as its
``clip_mean`` / ``clip_std`` so ``post_process_latents`` undoes the normalization for any
diffusers user of the export. ``prior.init_from`` starts a run from a diffusers-format prior
(:mod:`.prior_init`; its weights' hash joins the run name). The sampler over an export is
:mod:`.prior_sampler`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import PriorTransformer

from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import Columns, ShardSource

from ..config import PriorConfig
from ..diffusion import drop_condition, noised
from ..engine.artifacts import is_local
from ..engine.fit_result import FitResult
from ..engine.trainer import fit
from .caption_tokens import CaptionTokens, pack_condition
from .diffusion_task import ManifestDiffusionTask
from .prior_init import INIT_KEY, load_init_prior
from .prior_model import (
    MODEL_KIND,
    STD_FLOOR,
    SUBFOLDER,
    TOKENS_KEY,
    build_prior,
    predict_x0,
)
from .run_names import manifest_run_name


@dataclass(kw_only=True)
class PriorTask(CaptionTokens, ManifestDiffusionTask):
    """The prior as a :class:`~unclip.training.engine.trainer.TrainTask` over one dataset version."""

    MODEL_KIND: ClassVar[str] = MODEL_KIND
    SUBFOLDER: ClassVar[str] = SUBFOLDER
    PREDICTION: ClassVar[Literal["epsilon", "sample"]] = "sample"
    CLIP_SAMPLE: ClassVar[bool] = False
    TOKENS_KEY: ClassVar[str] = TOKENS_KEY

    cfg: PriorConfig
    image_mean: list[float]
    image_std: list[float]
    init_path: str | None = None  # cfg.init_from, absolute (workers run elsewhere)
    init_digest: str | None = None  # its weights' sha256: part of the run's identity

    @classmethod
    def from_manifest(
        cls, layout: StorageLayout, version: str, cfg: PriorConfig, holdout_fraction: float
    ) -> PriorTask:
        task = super().from_manifest(layout, version, cfg, holdout_fraction)
        if cfg.text_tokens:
            task.attach_clip_record(layout, task.clip_id)
        if cfg.init_from is not None:
            model, digest = load_init_prior(
                cfg.init_from, cfg, task.dim, task.clip_id, task.text_context
            )
            local = is_local(cfg.init_from)
            task.init_path = (
                os.path.abspath(cfg.init_from.removeprefix("file://")) if local else cfg.init_from
            )
            task.init_digest = digest
            # Keep the starting prior's normalization: its weights were trained in that space.
            task.image_mean = model.clip_mean.detach().view(-1).tolist()
            task.image_std = model.clip_std.detach().view(-1).tolist()
        return task

    @classmethod
    def train(
        cls, layout: StorageLayout, version: str, cfg: PriorConfig, holdout_fraction: float
    ) -> FitResult:
        """Train (or resume, or skip when done) on a dataset version; export to ``run_dir/export``."""
        task = cls.from_manifest(layout, version, cfg, holdout_fraction)
        return fit(task, cfg.trainer, layout, cls.MODEL_KIND, task.run_name())

    def run_name(self) -> str:
        """Hash of config, data version, seed and, when fine-tuning, the starting weights."""
        return manifest_run_name(
            self.MODEL_KIND,
            self.cfg,
            self.holdout_fraction,
            self.manifest_version,
            self.init_digest,
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.init_digest:
            out["init_weights"] = self.init_digest
        return out

    @classmethod
    def manifest_fields(cls, layout: StorageLayout, manifest: dict[str, Any]) -> dict[str, Any]:
        if int(manifest.get("num_samples", 0)) < 1:
            raise ValueError(
                f"dataset version {manifest['version']!r} has no samples: nothing to train on"
            )
        from unclip.datasets import readers  # pyarrow: loaded only to read data

        stats = readers.load_embedding_stats(layout, manifest)
        return {
            "image_mean": stats["image_mean"].tolist(),
            "image_std": stats["image_std"].tolist(),
        }

    def build_model(self) -> PriorTransformer:
        model = build_prior(
            self.cfg,
            self.dim,
            np.array(self.image_mean),
            np.array(self.image_std),
            self.text_context,
        )
        if self.init_path is not None:
            start, digest = load_init_prior(
                self.init_path, self.cfg, self.dim, self.clip_id, self.text_context
            )
            if digest != self.init_digest:
                raise RuntimeError(
                    f"{INIT_KEY}: the weights at {self.init_path} changed after the run was named"
                )
            model.load_state_dict(start.state_dict())
        return model

    def stream_source(self, manifest: dict[str, Any]) -> ShardSource:
        from unclip.datasets.stream_sources import EmbeddingSource

        return EmbeddingSource(self.layout, manifest, "train", self.holdout_fraction)

    @property
    def uses_text_tokens(self) -> bool:
        return self.cfg.text_tokens

    def batch(self, columns: Columns) -> dict[str, torch.Tensor]:
        mean = np.asarray(self.image_mean, np.float32)
        std = np.maximum(np.asarray(self.image_std, np.float32), STD_FLOOR)
        image = (np.asarray(columns["image_embedding"], np.float32) - mean) / std
        out = {
            "text": torch.from_numpy(np.ascontiguousarray(columns["text_embedding"], np.float32)),
            "image": torch.from_numpy(image.astype(np.float32)),
        }
        if self.cfg.text_tokens:
            enc, mask = self.token_encodings(list(columns["caption"]))
            out["tokens"], out["token_mask"] = torch.from_numpy(enc), torch.from_numpy(mask)
        return out

    def condition(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's condition rows: the text embedding, packed with its tokens when it has them."""
        if not self.cfg.text_tokens:
            return batch["text"]
        if "tokens" not in batch:
            raise ValueError(f"{TOKENS_KEY} is on but the batch has no token encodings")
        return pack_condition(batch["text"], batch["tokens"], batch["token_mask"])

    def export_info(self) -> dict[str, Any]:
        return {"candidates": self.cfg.candidates, **self.token_export_info()}

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # L = ‖f(x_t, t, y) − x_0‖²  (Ramesh et al. 2022, eq. in sec. 2.2), y dropped for CFG.
        # With text tokens the dropped rows lose their tokens too: the null condition is null.
        x0 = batch["image"]
        x_t, _, t = noised(self.train_scheduler(), x0)
        cond = drop_condition(self.condition(batch), self.cfg.cond_drop_prob)
        pred = predict_x0(model, x_t, t, cond)
        return F.mse_loss(pred.float(), x0.float()), {}


# Train (or resume, or skip when done) on a dataset version; export to ``run_dir/export``.
train_prior = PriorTask.train
