"""FID with torchmetrics on configured Inception-v3 weights, as sums each Ray worker returns and the driver pools."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from unclip.datasets.storage import exists


class _InceptionFeatures(torch.nn.Module):
    """torchvision Inception-v3's 2048-d pool features of uint8 images (resized to 299, ImageNet-normalized)."""

    num_features = 2048

    def __init__(self, checkpoint: str) -> None:
        super().__init__()
        import fsspec
        from torchvision.models import inception_v3

        net = inception_v3(weights=None, aux_logits=True, init_weights=False)
        with fsspec.open(checkpoint, "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.fc = torch.nn.Identity()
        self.net = net.eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.float() / 255.0, size=(299, 299), mode="bilinear")
        return self.net((x - self.mean) / self.std)


def fid_metric(checkpoint: str) -> Any:
    """A torchmetrics ``FrechetInceptionDistance`` on the configured Inception weights."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:
        raise ImportError(
            "evaluate.inception_checkpoint is set but torchmetrics is not installed: "
            "pip install 'unclip[eval]'"
        ) from e
    if not exists(checkpoint):
        raise FileNotFoundError(f"evaluate.inception_checkpoint {checkpoint} does not exist")
    return FrechetInceptionDistance(feature=_InceptionFeatures(checkpoint))


def fid_state(images: np.ndarray, checkpoint: str, real: bool) -> dict[str, torch.Tensor]:
    """One worker's FID sufficient statistics (feature sum, Σxxᵀ, count): they add up exactly."""
    metric = fid_metric(checkpoint)
    metric.update(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), real=real)
    return {k: v.clone() for k, v in metric.metric_state.items()}


def pooled_fid(real: np.ndarray, states: list[dict[str, torch.Tensor]], checkpoint: str) -> float:
    """FID of the real images against the sums of all workers' statistics (= all features at once)."""
    metric = fid_metric(checkpoint)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2).contiguous(), real=True)
    for s in states:
        metric.merge_state(s)
    return float(metric.compute())
