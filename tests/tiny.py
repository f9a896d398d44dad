"""The tiny configs the tests build on: one CLIP, one trainer, the pipeline's asset names.

Test modules import it by name (``from tiny import TINY_CLIP``): ``tests/`` is on pytest's
``pythonpath``, as are the other shared helpers (``shrunk_config``, ``training_helpers``).
"""

from __future__ import annotations

from typing import Any

from unclip.datasets.config import ClipConfig
from unclip.training.config import TrainerConfig

# The tiny CLIP's widths; the shrunk demo keeps the demo's image size and context length.
TINY_CLIP_WIDTHS = {
    "embed_dim": 32,
    "vision_width": 64,
    "vision_layers": 1,
    "text_width": 64,
    "text_layers": 1,
    "heads": 2,
}
TINY_CLIP = ClipConfig(**TINY_CLIP_WIDTHS, image_size=32, patch_size=8, context_length=16)

# Two Ray Train workers, ZeRO-1: the trainer section of the shrunk demo.
TINY_TRAINER: dict[str, Any] = {
    "num_workers": 2,
    "zero_stage": 1,
    "batch_size": 16,
    "warmup_steps": 2,
    "checkpoint_every": 10,
    "log_every": 2,
}


def tiny_trainer(**overrides: Any) -> TrainerConfig:
    """TINY_TRAINER for the training tests' small stores: 8-row batches, 12 fast steps, 2 checkpoints."""
    base = {
        **TINY_TRAINER,
        "batch_size": 8,
        "lr": 3e-2,
        "max_steps": 12,
        "checkpoint_every": 6,
        "report_every_s": 0.0,
        "shuffle_block": 16,  # two micro-batches: several blocks an epoch
    }
    return TrainerConfig(**{**base, **overrides})


# The pipeline's assets, each after everything it reads.
ASSETS_IN_ORDER = (
    "url_lists",
    "image_shards",
    "clip_model",
    "embeddings",
    "curated_embeddings",
    "dataset_manifest",
    "prior",
    "decoder",
    "upsampler",
    "evaluation",
    "promotion",
)
