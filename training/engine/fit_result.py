"""What a training run produced: a plain record, importable without torch or Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FitResult:
    """What a training run produced; ``skipped`` when it had finished before."""

    run_name: str
    run_dir: str
    export_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
