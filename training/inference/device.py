"""Which device inference runs on: asked for by config or flag, ``auto`` meaning a GPU if any."""

from __future__ import annotations

from typing import Literal

import torch

Device = Literal["auto", "cpu", "cuda"]
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str, gpus_available: int | None = None) -> str:
    """``cpu`` / ``cuda`` / ``cuda:N`` as given; ``auto``: ``cuda`` when a GPU is there, else ``cpu``.

    ``gpus_available`` is what a scheduler (a Ray cluster) offers; None counts this process's GPUs.
    Asking for CUDA where there is none is an error, not a silent fall back to the CPU.
    """
    if device not in DEVICES and not device.startswith("cuda:"):
        raise ValueError(f"device must be one of {DEVICES} or cuda:N, got {device!r}")
    if gpus_available is None:
        gpus_available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda" if gpus_available > 0 else "cpu"
    if device.startswith("cuda") and gpus_available < 1:
        raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available here")
    return device
