"""Where a run's data stream stands, as a checkpoint records it, and what the streams read.

A worker's stream position follows from the micro-step by arithmetic
(:class:`~unclip.datasets.stream.StreamPlan`); what a checkpoint adds is the world size and
the epoch its current world started at, so a resume under another world (allowed only at an
epoch boundary) continues the same epochs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from unclip.datasets.stream import RankStream, ShardSource, StreamPlan, check_world_change

log = logging.getLogger(__name__)


class StreamPosition:
    """Where the run's stream stands: the epoch and micro-step its current world started at.

    Micro-step ``k`` reads stream step ``origin_epoch * steps_per_epoch + (k - origin_step)``
    of the plan; a resume with the same world keeps the origin, one with another world (allowed
    only at an epoch boundary) starts a new origin there.
    """

    def __init__(self, plan: StreamPlan, origin_step: int, origin_epoch: int) -> None:
        self.plan, self.origin_step, self.origin_epoch = plan, origin_step, origin_epoch

    @classmethod
    def resumed(
        cls, saved: dict[str, Any] | None, plan: StreamPlan, micro_step: int, world: int
    ) -> StreamPosition:
        if not saved:  # a fresh run, or a checkpoint that predates stream positions
            return cls(plan, 0, 0)
        check_world_change(int(saved["world"]), world, int(saved["micro_in_epoch"]))
        if int(saved["world"]) == world:
            return cls(plan, int(saved["origin_step"]), int(saved["origin_epoch"]))
        return cls(plan, micro_step, int(saved["epoch"]))

    def stream_step(self, micro_step: int) -> int:
        return self.origin_epoch * self.plan.steps_per_epoch + micro_step - self.origin_step

    def state(self, micro_step: int, source: ShardSource) -> dict[str, Any]:
        """What a checkpoint records of the stream (every rank's position follows from it)."""
        epoch, i = divmod(self.stream_step(micro_step), self.plan.steps_per_epoch)
        return {
            "world": self.plan.world,
            "epoch": epoch,
            "micro_in_epoch": i,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "origin_step": self.origin_step,
            "origin_epoch": self.origin_epoch,
            "source": source.identity(),
        }


def stream_totals(
    stream: RankStream, device: torch.device, first_step_s: float
) -> dict[str, float]:
    """Stream counters summed over ranks; bytes read, time to first step and memory: worst rank."""
    import resource

    import torch.distributed as dist

    s = stream.stats
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    total = torch.tensor([s.samples, s.replaced], dtype=torch.float64, device=device)
    most = torch.tensor([s.bytes_read, first_step_s, rss_mb], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    if s.errors:
        log.warning("stream: %d samples replaced, e.g. %s", s.replaced, s.errors[:3])
    return {
        "stream_samples": float(total[0]),
        "stream_replaced": float(total[1]),
        "stream_bytes_read_max_rank": float(most[0]),
        "first_step_s_max_rank": float(most[1]),
        "peak_rss_mb_max_rank": float(most[2]),
    }
