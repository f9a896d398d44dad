"""How the trainer optimizes: AdamW (fused) with its weight-decay groups, the warm-up + cosine
learning-rate schedule, the DeepSpeed config of a trainer config, and DeepSpeed imported without
what training never uses. The worker loop (:mod:`.train_loop`) puts them together."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..trainer_config import TrainerConfig


def warmup_cosine(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """LR factor of optimizer step ``k``: linear warm-up to 1, then cosine decay towards 0.

    Not diffusers' ``get_cosine_schedule_with_warmup``: its warm-up gives step k the factor
    k / W (the first update has LR 0) where this one gives (k + 1) / W, and past ``max_steps``
    its cosine rises again. Runs are named by their config, not by this code, so switching would
    train different weights under the names of runs already trained or half-trained.
    """

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        progress = (k - warmup_steps) / max(1, max_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def ds_config(cfg: TrainerConfig) -> dict[str, Any]:
    """The DeepSpeed config of a trainer config."""
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no op compiles
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip > 0:
        conf["gradient_clipping"] = cfg.grad_clip
    return conf


# DeepSpeed ops that training never calls but DeepSpeed's communication backend loads: the CPU
# shared-memory all-reduce serves only ``inference_all_reduce`` (tensor-parallel inference);
# training all-reduces through torch.distributed. Loading it JIT-builds it once per environment
# (about 30 s on 2 CPUs: a fresh clone's demo paid it in its first training run).
UNUSED_OPS = ("deepspeed_shm_comm",)


def import_deepspeed() -> Any:
    """``import deepspeed``, without the mlflow import its autotuner makes at import time.

    DeepSpeed's autotuner imports mlflow, if installed, only to log autotuning experiments, which
    training never runs; the import costs each Ray Train worker 1-2 s of its start on 2 CPUs. A
    worker whose run reports to mlflow imports it anyway, later and as usual.
    """
    import sys

    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    return deepspeed


def skip_unused_ops(deepspeed: Any) -> None:
    """Mark :data:`UNUSED_OPS` incompatible, so DeepSpeed neither builds nor loads them."""
    compatible = deepspeed.ops.__compatible_ops__  # DeepSpeed's own cached dict: edits persist
    for name in UNUSED_OPS:
        compatible[name] = False


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings vectors (ndim < 2)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused: one kernel over all tensors (on CPU 3-5x faster
    than the per-tensor loop; it matters for a large token embedding such as CLIP's)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
