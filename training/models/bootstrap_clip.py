"""The bootstrap CLIP as a :class:`~unclip.training.engine.trainer.TrainTask`: open_clip's contrastive loss
on the ingested (image, caption) pairs, before any embedding exists.

Its export is a ``save_clip`` checkpoint, so ``unclip.datasets.clip.load_clip(cfg, export_dir)``
loads it like any other open_clip model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import open_clip
import torch

from unclip.datasets import readers
from unclip.datasets.clip import bootstrap_preprocess_config, build_bootstrap_clip, save_clip
from unclip.datasets.config import ClipConfig
from unclip.datasets.storage import StorageLayout
from unclip.datasets.stream import Columns

from ..config import BootstrapClipConfig
from ..engine.fit_result import FitResult
from ..engine.trainer import TrainTask, fit
from .run_names import CLIP_KIND, bootstrap_clip_run_name

if TYPE_CHECKING:
    from unclip.datasets.stream_sources import IngestedImageSource

MODEL_KIND = CLIP_KIND
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp of the learned temperature (Radford et al. 2021, sec. 2.5)


def clip_outputs(out: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image features, text features, logit scale) from open_clip's dict or tuple output."""
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def normalize_images(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] → float [N, 3, H, W] normalized like open_clip's preprocessing."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def swapped_caption(caption: str, swaps: Sequence[tuple[str, str]]) -> str:
    """The caption with every word of each pair exchanged for the other ("a red circle left of
    a blue square" → "… right of …" for ("left", "right")); unchanged when it has none."""
    exchange = {a: b for a, b in swaps} | {b: a for a, b in swaps}
    return " ".join(exchange.get(word, word) for word in caption.split(" "))


def _digest(keys: frozenset[str]) -> str:
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


@dataclass
class ClipTask(TrainTask):
    """Contrastive training of the bootstrap open_clip model on images and captions of sources."""

    layout: StorageLayout
    clip_cfg: ClipConfig
    source_ids: list[str]
    holdout_fraction: float
    removed: frozenset[str] = frozenset()  # global keys of semantic dedup's removal lists
    negative_swaps: tuple[tuple[str, str], ...] = ()  # BootstrapClipConfig.negative_swaps
    _mean_std: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False
    )

    def describe(self) -> dict[str, Any]:
        return {
            "model": MODEL_KIND,
            "clip": self.clip_cfg.identity(),
            "sources": sorted(self.source_ids),
            "holdout_fraction": self.holdout_fraction,
            **({"removed": _digest(self.removed)} if self.removed else {}),
            **(
                {"negative_swaps": [list(p) for p in self.negative_swaps]}
                if self.negative_swaps
                else {}
            ),
        }

    def build_model(self) -> torch.nn.Module:
        return build_bootstrap_clip(self.clip_cfg)

    def _norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        pp = bootstrap_preprocess_config(self.clip_cfg)
        return torch.tensor(pp["mean"]), torch.tensor(pp["std"])

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return open_clip.tokenize(captions, context_length=self.clip_cfg.context_length)

    def data(self) -> IngestedImageSource:
        from unclip.datasets.stream_sources import IngestedImageSource

        return IngestedImageSource(
            self.layout,
            self.source_ids,
            "train",
            self.holdout_fraction,
            self.clip_cfg.image_size,
            removed=self.removed,
        )

    def batch(self, columns: Columns) -> dict[str, torch.Tensor]:
        images = columns["image"]
        size = self.clip_cfg.image_size
        if images.shape[1:] != (size, size, 3):
            raise ValueError(f"clip images must be [N, {size}, {size}, 3], got {images.shape}")
        if self._mean_std is None:
            self._mean_std = self._norm()
        mean, std = self._mean_std
        captions = list(columns["caption"])
        # hard negatives (negative_swaps) follow the captions: text rows beyond the images'
        negatives = [n for c in captions if (n := swapped_caption(c, self.negative_swaps)) != c]
        return {
            "image": normalize_images(images, mean, std),
            "text": self.tokenize(captions + negatives),
        }

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        # Symmetric InfoNCE over the micro-batch (Radford et al. 2021, fig. 3), as open_clip's
        # ClipLoss on one process computes it; hard-negative captions (the text rows beyond the
        # images') are extra columns of the image-to-text softmax only (NegCLIP).
        image_f, text_f, scale = clip_outputs(model(batch["image"], batch["text"]))
        scale = scale.clamp(max=MAX_LOGIT_SCALE).float()
        image_f, text_f = image_f.float(), text_f.float()
        n = len(image_f)
        labels = torch.arange(n, device=image_f.device)
        per_image = torch.nn.functional.cross_entropy(scale * image_f @ text_f.T, labels)
        per_text = torch.nn.functional.cross_entropy(scale * text_f[:n] @ image_f.T, labels)
        return (per_image + per_text) / 2, {"logit_scale": float(scale.detach())}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        """Zero-shot accuracy on held-out images: the right caption among the distinct held-out ones."""
        held = readers.load_images_captions(
            self.layout,
            self.source_ids,
            "holdout",
            self.holdout_fraction,
            self.clip_cfg.image_size,
            self.removed,
        )
        if not held.captions:
            return {}
        classes = sorted(set(held.captions))
        return {
            "zero_shot_accuracy": zero_shot_accuracy(
                model, self, held.images, held.captions, classes
            ),
            "zero_shot_classes": float(len(classes)),
            "holdout_images": float(len(held.captions)),
        }

    def export(self, model: torch.nn.Module, directory: str) -> None:
        save_clip(model, self.clip_cfg, directory)


@torch.no_grad()
def zero_shot_accuracy(
    model: torch.nn.Module,
    task: ClipTask,
    images: np.ndarray,
    captions: list[str],
    classes: list[str],
    batch_size: int = 256,
) -> float:
    """Fraction of images whose nearest caption (cosine, among ``classes``) is their own."""
    model.eval()
    mean, std = task._norm()
    text_f = model.encode_text(task.tokenize(classes), normalize=True)
    index = {c: i for i, c in enumerate(classes)}
    right = 0
    for i in range(0, len(images), batch_size):
        x = normalize_images(images[i : i + batch_size], mean, std)
        pred = (model.encode_image(x, normalize=True) @ text_f.T).argmax(dim=1)
        truth = torch.tensor([index[c] for c in captions[i : i + batch_size]])
        right += int((pred == truth).sum())
    return right / max(1, len(images))


def train_bootstrap_clip(
    layout: StorageLayout,
    clip_cfg: ClipConfig,
    boot: BootstrapClipConfig,
    source_ids: list[str],
    holdout_fraction: float,
) -> FitResult:
    """Train (or resume, or skip when done) the bootstrap CLIP; ``export_dir`` is a ``save_clip`` checkpoint."""
    if clip_cfg.model_name is not None:
        raise ValueError(
            f"clip.model_name is {clip_cfg.model_name!r}: the bootstrap CLIP is trained only "
            "when no pretrained CLIP is configured"
        )
    if not source_ids:
        raise ValueError("train_bootstrap_clip: no source ids to train on")
    task = ClipTask(
        layout,
        clip_cfg,
        sorted(source_ids),
        holdout_fraction,
        negative_swaps=tuple(tuple(p) for p in boot.negative_swaps),
    )
    name = bootstrap_clip_run_name(clip_cfg, boot, holdout_fraction, source_ids)
    return fit(task, boot.trainer, layout, MODEL_KIND, name)
