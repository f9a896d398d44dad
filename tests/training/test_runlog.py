"""``metrics.jsonl``: written in batches, whole after a kill, and resumed without lost or repeated rows."""

from __future__ import annotations

import json

import pytest

from unclip.training.engine import runlog as runlog_module
from unclip.training.engine.runlog import RunLog, read_rows


@pytest.fixture
def writes(monkeypatch):
    """The paths of every whole-file write the run log makes, in order."""
    made: list[str] = []
    real = runlog_module.atomic_write

    def counted(path, mode="wb"):
        made.append(path)
        return real(path, mode)

    monkeypatch.setattr(runlog_module, "atomic_write", counted)
    return made


def rows(first: int, last: int, every: int = 1) -> list[dict]:
    return [{"step": s, "loss": 1.0 / s} for s in range(first, last + 1, every)]


@pytest.mark.parametrize("root", ["local", "memory"])
def test_rows_are_written_in_batches_not_one_write_per_row(tmp_path, writes, root):
    run_dir = str(tmp_path) if root == "local" else f"memory://runlog-{tmp_path.name}"
    log = RunLog(run_dir, flush_rows=10, flush_s=3600)
    log.resume(0)
    for row in rows(1, 25):
        log.append(row)
    assert len(writes) == 2  # after rows 10 and 20, not 25 times
    assert [r["step"] for r in read_rows(log.path)] == list(range(1, 21))
    log.flush()  # a checkpoint: every row so far on file
    log.flush()  # nothing new: no write
    assert len(writes) == 3
    assert read_rows(log.path) == rows(1, 25)


def test_a_write_is_due_after_flush_s_seconds_even_with_few_rows(tmp_path, writes):
    log = RunLog(str(tmp_path), flush_rows=1000, flush_s=0.0)
    log.append({"step": 1, "loss": 1.0})
    assert len(writes) == 1 and read_rows(log.path) == [{"step": 1, "loss": 1.0}]


def test_a_killed_run_resumes_without_repeating_or_losing_rows(tmp_path):
    """The first life checkpoints at step 30, writes rows to step 40, logs to 45 and dies; the
    second resumes at 30 and runs to 60. The file ends with every step once, the rows up to the
    checkpoint being the first life's."""
    first = RunLog(str(tmp_path), flush_rows=4, flush_s=3600)
    first.resume(0)
    for row in rows(2, 30, 2):
        first.append(row)
    first.flush()  # the checkpoint of step 30
    for row in rows(32, 45, 2):  # written at 38 (4 rows after 30); 40-44 only in memory
        first.append({**row, "life": 1})
    on_file = [r["step"] for r in read_rows(first.path)]
    assert on_file[-1] == 38 and on_file == sorted(set(on_file))
    del first  # killed

    second = RunLog(str(tmp_path), flush_rows=4, flush_s=3600)
    second.resume(30)
    assert second.rows == rows(2, 30, 2)
    for row in rows(32, 60, 2):
        second.append({**row, "life": 2})
    second.flush()
    final = read_rows(second.path)
    assert [r["step"] for r in final] == list(range(2, 61, 2))
    assert final[:15] == rows(2, 30, 2) and {r["life"] for r in final[15:]} == {2}


def test_a_resume_with_nothing_new_still_drops_the_rows_past_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows(1, 8)))
    log = RunLog(str(tmp_path), flush_rows=100, flush_s=3600)
    log.resume(5)
    log.flush()
    assert read_rows(str(path)) == rows(1, 5)


def test_flush_rows_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="flush_rows must be >= 1"):
        RunLog(str(tmp_path), flush_rows=0)
