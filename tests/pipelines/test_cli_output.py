"""What the CLI prints off a terminal: plain stage lines as they happen, log lines through one
root handler, -v / -q."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from unclip.pipelines import cli_output
from unclip.pipelines.cli import _session, app
from unclip.pipelines.cli_output import LOG_HANDLER_NAME, install_log_handler


@pytest.fixture
def root_logging():
    """Restore the root logger's handlers and levels the CLI changes."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    unclip_level = logging.getLogger("unclip").level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("unclip").setLevel(unclip_level)


def test_stage_events_print_plain_lines_as_they_happen_off_a_terminal(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"storage: {tmp_path / 'store'}\n")
    assert not cli_output.console.is_terminal
    with _session(config, None, ["image_shards"]) as s:
        s.board("start", "url_lists")
        assert capsys.readouterr().out.split(" ", 1)[1] == "stage url_lists: running (run 1)\n"
        s.board("success", "url_lists")
        s.board("start", "image_shards")
        s.board("failure", "image_shards")
        lines = capsys.readouterr().out.splitlines()
    assert [ln.split(" ", 1)[1].rsplit(" (", 1)[0] for ln in lines] == [
        "stage url_lists: done",
        "stage image_shards: running",
        "stage image_shards: failed",
    ]
    table = capsys.readouterr().out  # the per-stage table once, at the end
    assert "unclip pipeline" in table and "failed" in table and "\x1b[" not in table


def test_the_root_handler_prints_unclips_info_lines_and_quiet_keeps_warnings(root_logging, capsys):
    progress = logging.getLogger("unclip.training.progress")
    install_log_handler(0)
    install_log_handler(0)  # again: replaced, not doubled
    assert [h.get_name() for h in root_logging.handlers].count(LOG_HANDLER_NAME) == 1
    progress.info("prior p-1 step 2/12 (17%%) loss %.3f", 0.5)
    logging.getLogger("some.library").info("chatter")
    out = capsys.readouterr().out
    assert "INFO unclip.training.progress: prior p-1 step 2/12 (17%) loss 0.500" in out
    assert "chatter" not in out
    install_log_handler(-1)
    progress.info("hidden")
    progress.warning("shown")
    out = capsys.readouterr().out
    assert "hidden" not in out and "WARNING unclip.training.progress: shown" in out
    install_log_handler(1)
    logging.getLogger("unclip.datasets").debug("details")
    assert "DEBUG unclip.datasets: details" in capsys.readouterr().out


def test_verbosity_options_come_before_the_command(root_logging, tmp_path, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    runner = CliRunner()
    for flag, level in [("-q", logging.WARNING), ("--verbose", logging.DEBUG)]:
        config = tmp_path / f"{flag.strip('-')}.yaml"
        config.write_text(f"storage: {tmp_path / flag.strip('-')}\n")
        result = runner.invoke(app, [flag, "status", str(config)])
        assert result.exit_code == 0, result.output
        assert logging.getLogger("unclip").level == level


def test_on_a_terminal_progress_records_draw_bars_instead_of_lines(root_logging, capsys):
    from unclip.datasets.progress_records import bars_drawn, progress_extra
    from unclip.pipelines.cli_output import StageBoard, live_board

    install_log_handler(0)
    log = logging.getLogger("unclip.datasets.embed")
    with live_board(StageBoard(["embeddings"])) as bars:
        assert bars_drawn()
        log.info("embed s1: 1/4 shards done", extra=progress_extra("embed s1", 1, 4))
        log.info("embed s1: 3/4 shards done", extra=progress_extra("embed s1", 3, 4))
        log.info("an ordinary line")
        (task,) = bars.progress.tasks
        assert (task.description, task.completed, task.total) == ("embed s1", 3, 4)
    assert not bars_drawn()
    out = capsys.readouterr().out
    assert "an ordinary line" in out and "shards done" not in out
    log.info("embed s1: 4/4 shards done", extra=progress_extra("embed s1", 4, 4))
    assert "embed s1: 4/4 shards done" in capsys.readouterr().out  # no bars: the line again
