"""The one trainer's config section (every model's ``trainer:``), and ``setting``: a field that
does not change what a run trains."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_core import PydanticUndefined

from unclip.datasets.config_base import IDENTITY_UNLESS_DEFAULT, NOT_IDENTITY, IdentitySection


def setting(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A ``Field`` that does not change what a run trains (sampling, bookkeeping): it is left out
    of the run name's hash, so changing it reuses the trained run instead of retraining."""
    return Field(default, json_schema_extra=NOT_IDENTITY, **kwargs)


class TrainerConfig(IdentitySection):
    """The one trainer (Ray Train TorchTrainer + DeepSpeed) that every model uses."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL; else CPU with gloo.")
    cpus_per_worker: float = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 needs CUDA.")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    batch_size: int = Field(64, ge=1, description="Micro-batch per worker.")
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(50, ge=0)
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping.")
    checkpoint_every: int = setting(250, ge=1)
    keep_last: int = setting(2, ge=1)
    log_every: int = setting(10, ge=1, description="Steps per row of metrics.jsonl.")
    report_every_s: float = setting(
        10.0,
        ge=0,
        description="Least seconds between metric reports to Ray Train (a report can wait for its controller).",
    )
    seed: int = 0
    max_failures: int = setting(
        0,
        ge=0,
        description="Ray Train restarts of a run whose worker died, from its last checkpoint.",
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="EMA of the weights (0 disables); the export uses the EMA weights.",
    )
    ema_update_after: int = Field(0, ge=0, description="Steps before the EMA starts averaging.")
    shuffle_block: int = Field(
        4096,
        ge=1,
        description="Samples a worker reads, decodes and shuffles at a time (rounded down to a "
        "multiple of batch_size): the bound on its data memory. Shards are shuffled every "
        "epoch besides; a larger block mixes more, at more memory and a slower first step.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,
    )
    prefetch_batches: int = setting(
        4,
        ge=0,
        description="Micro-batches a worker's stream prepares ahead of the step, on a thread "
        "(0: read in the step's own thread).",
    )
    decode_threads: int = setting(
        1,
        ge=1,
        description="Threads decoding images for a worker's stream (beside the prefetch thread).",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = setting(
        default_factory=list,
        description="Experiment trackers that get every metrics.jsonl row, and the evaluation's "
        "metrics (eval/...) and sample grid at the last step, as the --report_to of diffusers' "
        "training scripts: 'none' (the default), one name, or a list of tensorboard (event "
        "files in the run folder's tensorboard/), mlflow (MLFLOW_TRACKING_URI, else an SQLite "
        "store mlflow.db in the run folder; a resume continues the MLflow run of the same name), "
        "wandb (W&B's own settings; run id = run name). Each needs its extra: pip install "
        "'unclip[tensorboard]'.",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers_as_list(cls, value: object) -> object:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value
