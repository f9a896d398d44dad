"""Where a run's stream stands in a checkpoint, and what a resume makes of it (no Ray)."""

from __future__ import annotations

import json
import logging

import torch
from resume_fakes import Rows

from unclip.datasets.stream import StreamPlan
from unclip.training.engine.stream_position import StreamPosition, stream_totals


def test_a_fresh_run_streams_from_the_start_and_a_checkpoint_records_where_it_stands():
    source = Rows()
    two = StreamPlan.make(source.shards, 1, 2, 8, 16, seed=0)  # 6 steps an epoch
    for saved in (None, {}):  # a fresh run, or a checkpoint from before stream positions
        fresh = StreamPosition.resumed(saved, two, 7, world=2)
        assert (fresh.origin_step, fresh.origin_epoch, fresh.stream_step(7)) == (0, 0, 7)
    assert StreamPosition(two, 0, 0).state(8, source) == {
        "world": 2,
        "epoch": 1,
        "micro_in_epoch": 2,
        "steps_per_epoch": 6,
        "origin_step": 0,
        "origin_epoch": 0,
        "source": {"shards": 5, "samples": 96},
    }


def test_a_world_change_starts_a_new_origin_that_later_resumes_keep():
    source = Rows()
    two = StreamPlan.make(source.shards, 0, 2, 8, 16, seed=0)  # 6 steps an epoch
    one = StreamPlan.make(source.shards, 0, 1, 8, 16, seed=0)  # 12 steps an epoch
    # 2 epochs of world 2 (micro-steps 0-11), then world 1 from micro-step 12 at epoch 2
    moved = StreamPosition.resumed(StreamPosition(two, 0, 0).state(12, source), one, 12, world=1)
    assert (moved.origin_step, moved.origin_epoch) == (12, 2)
    assert moved.stream_step(15) == 2 * 12 + 3
    later = moved.state(15, source)
    assert (later["world"], later["epoch"], later["micro_in_epoch"]) == (1, 2, 3)
    assert (later["origin_step"], later["origin_epoch"], later["steps_per_epoch"]) == (12, 2, 12)
    again = StreamPosition.resumed(later, one, 15, world=1)  # same world: the origin is kept
    assert (again.origin_step, again.origin_epoch, again.stream_step(15)) == (12, 2, 27)
    # a world change at a later epoch boundary: the new origin is that epoch, at that step
    back = StreamPosition.resumed(moved.state(24, source), two, 24, world=2)
    assert (back.origin_step, back.origin_epoch, back.stream_step(25)) == (24, 3, 19)


def test_the_stream_totals_sum_the_counts_and_keep_the_worst_rank(tmp_path, caplog):
    import resource
    from types import SimpleNamespace

    import torch.distributed as dist

    from unclip.datasets.stream import StreamStats

    errors = [f"shard {i}: bad jpeg" for i in range(4)]
    stats = StreamStats(errors=errors, bytes_read=4096, samples=40, replaced=4)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        with caplog.at_level(logging.WARNING, logger="unclip.training.engine.stream_position"):
            totals = stream_totals(SimpleNamespace(stats=stats), torch.device("cpu"), 1.5)
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        quiet = stream_totals(SimpleNamespace(stats=StreamStats()), torch.device("cpu"), 0.0)
    finally:
        dist.destroy_process_group()
    peak = totals.pop("peak_rss_mb_max_rank")
    assert peak_before <= peak <= peak_after  # the peak resident memory, in MiB
    assert totals == {
        "stream_samples": 40.0,
        "stream_replaced": 4.0,
        "stream_bytes_read_max_rank": 4096.0,
        "first_step_s_max_rank": 1.5,
    }
    assert f"stream: 4 samples replaced, e.g. {errors[:3]}" in caplog.text
    assert caplog.text.count("samples replaced") == 1  # none for a stream without errors
    assert quiet["stream_samples"] == 0.0 and quiet["peak_rss_mb_max_rank"] > 50


def test_a_resume_in_the_same_large_world_keeps_its_origin():
    rows = Rows(n=1200, shard_size=100)
    plan = StreamPlan.make(rows.shards, 0, 300, 1, 1, seed=0)  # 4 steps an epoch
    # as a checkpoint gives it back: numbers parsed from JSON, not the ones written
    saved = json.loads(json.dumps(StreamPosition(plan, 5, 1).state(10, rows)))
    assert (saved["world"], saved["epoch"], saved["micro_in_epoch"]) == (300, 2, 1)
    again = StreamPosition.resumed(saved, plan, 10, world=int("300"))
    assert (again.origin_step, again.origin_epoch, again.stream_step(10)) == (5, 1, 9)
