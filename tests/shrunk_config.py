"""The demo config shrunk to seconds: shared by the end-to-end and the cluster tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from tiny import TINY_CLIP_WIDTHS, TINY_TRAINER

from unclip.pipelines.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

SHRINK = {
    "synthetic": {"num_pairs": 240},
    "ingest": {"samples_per_shard": 100, "thread_count": 8},
    "clip": TINY_CLIP_WIDTHS,
    "bootstrap": {"trainer": {**TINY_TRAINER, "max_steps": 12}},
    "embed": {"batch_size": 64},
    "prior": {
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "sample_steps": 5,
        "trainer": {**TINY_TRAINER, "max_steps": 12},
    },
    "decoder": {
        "image_size": 16,
        "block_out_channels": [16, 32],
        "sample_steps": 5,
        "trainer": {**TINY_TRAINER, "max_steps": 12, "zero_stage": 2},
    },
    "upsampler": {
        "input_size": 16,
        "output_size": 32,
        "block_out_channels": [16, 32],
        "crop_size": 16,
        "sample_steps": 2,
        "trainer": {**TINY_TRAINER, "max_steps": 6},
    },
    "evaluate": {
        "holdout_fraction": 0.1,
        "captions": ["a red circle", "a blue square"],
        "samples_per_caption": 1,
        "num_eval_samples": 8,
        "eval_steps": 3,
    },
}


def write_shrunk_config(
    path: Path, storage: str | Path, extra: dict[str, Any] | None = None
) -> Path:
    """Write demo.yaml + SHRINK (+ ``extra``) with ``storage`` as one self-contained config."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw = deep_merge(deep_merge(raw, SHRINK), extra or {})
    raw["storage"] = str(storage)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path
