"""The ``unclip`` command line: the whole pipeline, or one stage, from a YAML config.

Every pipeline command runs the jobs of ``definitions.py`` (what the Dagster UI runs) on the
assets it names and everything upstream of them: command → ``runner.run_pipeline`` → asset →
the stage's function in ``unclip.datasets`` or ``unclip.training``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from unclip.datasets.storage import StorageLayout
from unclip.pipelines.cli_embeddings import export_embeddings_command, import_embeddings_command
from unclip.pipelines.cli_models import export, sample
from unclip.pipelines.cli_options import ConfigArg, SetOpt, WaitOpt, load_cli_config
from unclip.pipelines.cli_output import (
    StageBoard,
    console,
    fail,
    install_log_handler,
    live_board,
    print_outputs,
)
from unclip.pipelines.config import (
    PipelineConfig,
)

if TYPE_CHECKING:
    from unclip.pipelines.runner import PipelineRun

app = typer.Typer(
    help=(
        "unclip: (image URL, caption) lists to a trained, evaluated DALL-E 2-style model.\n\n"
        "Every command takes a pipeline config (YAML; see configs/ and docs/config.md). Work runs "
        "on an embedded Ray, or on the cluster at RAY_ADDRESS when it is set. Every stage is "
        "idempotent: re-running does only what is missing."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _logging_options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also unclip's debug log lines.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Only warnings and errors in the log.")
    ] = False,
) -> None:
    # Every command logs through one root handler: rich on a terminal, plain lines elsewhere.
    install_log_handler(-1 if quiet else int(verbose))


train_app = typer.Typer(
    help="Train one model (and whatever it needs that is missing).", no_args_is_help=True
)
app.add_typer(train_app, name="train")


@dataclass
class Session:
    """One command's config, overrides and the board its runs report to."""

    config: Path
    cfg: PipelineConfig
    overrides: dict[str, Any]
    board: StageBoard
    run: PipelineRun | None = None


@contextlib.contextmanager
def _session(config: Path, sets: list[str] | None, targets: list[str] | None) -> Iterator[Session]:
    """Load the config, show the stage board while the runs go, and turn failures into exits."""
    from unclip.datasets.lease import LeaseHeld
    from unclip.pipelines.runner import STAGES, PipelineFailed, upstream_names

    cfg, overrides = load_cli_config(config, sets)
    stages = STAGES if targets is None else upstream_names(targets)
    live = console.is_terminal  # elsewhere a live table prints only once, at the end
    board = StageBoard(stages, echo=None if live else console.print)
    t0 = time.monotonic()
    try:
        with live_board(board) if live else _printed_at_end(board):
            session = Session(config, cfg, overrides, board)
            yield session
    except LeaseHeld as e:
        console.print(f"[red]error:[/red] storage root {cfg.storage}: {e}")
        raise typer.Exit(3) from None
    except PipelineFailed as e:
        console.print(f"[red]stage {e.stage} failed[/red] (Dagster run {e.run.run_id})\n{e}")
        raise typer.Exit(1) from None
    session_run = session.run
    console.print()
    if session_run is not None:
        console.print(
            f"finished in {time.monotonic() - t0:,.1f} s: {len(session_run.run_ids)} Dagster runs "
            f"over {len(session_run.partitions)} source partitions ({session_run.dagster_home})"
        )


@contextlib.contextmanager
def _printed_at_end(board: StageBoard) -> Iterator[None]:
    """Off a terminal: the board's table once the runs end (its lines came as they happened)."""
    try:
        yield
    finally:
        console.print(board)


def _stage_command(targets: list[str], doc: str) -> Any:
    """A command that materializes ``targets`` and everything upstream of them."""

    def command(config: ConfigArg, set_: SetOpt = None) -> None:
        from unclip.pipelines.runner import run_pipeline, upstream_of

        with _session(config, set_, targets) as s:
            s.run = run_pipeline(
                str(s.config), s.cfg, s.overrides, s.board, select=upstream_of(targets)
            )
        print_outputs(s.cfg, s.run.outputs)

    command.__doc__ = doc
    return command


@app.command()
def run(
    config: ConfigArg,
    set_: SetOpt = None,
    retrain_clip: Annotated[
        bool,
        typer.Option(
            "--retrain-clip",
            help="Train a new bootstrap CLIP on every source (re-embeds everything).",
        ),
    ] = False,
    wait: WaitOpt = 0.0,
) -> None:
    """Run the whole pipeline: sources → ingest → CLIP → embed → manifest → prior, decoder → evaluate → promote."""
    from unclip.pipelines.runner import run_pipeline

    with _session(config, set_, None) as s:
        if retrain_clip:
            from unclip.training.models.clip_pin import unpin_clip

            if unpin_clip(StorageLayout(s.cfg.storage)):
                console.print(
                    "unpinned the bootstrap CLIP: it retrains on every source, then re-embeds"
                )
        s.run = run_pipeline(str(s.config), s.cfg, s.overrides, s.board, wait_s=wait)
    print_outputs(s.cfg, s.run.outputs)


@app.command()
def ingest(
    config: ConfigArg,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="Also re-download failed samples of finished shards (into new shards).",
        ),
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Download every source's missing shards with img2dataset on Ray."""
    from unclip.pipelines.runner import run_pipeline, upstream_of

    with _session(config, set_, ["image_shards"]) as s:
        s.run = run_pipeline(
            str(s.config),
            s.cfg,
            s.overrides,
            s.board,
            select=upstream_of(["image_shards"]),
            retry_failed=retry_failed,
        )
    print_outputs(s.cfg, s.run.outputs)


@app.command("curate")
def curate_command(
    config: ConfigArg,
    set_: SetOpt = None,
    recluster: Annotated[
        bool,
        typer.Option(
            "--recluster",
            help="Fit new semantic-dedup centroids over every shard: a new version of the "
            "removal lists (the version in use stays until this run commits).",
        ),
    ] = False,
) -> None:
    """Run semantic dedup on the embeddings (new shards only, unless --recluster)."""
    sets = [*(set_ or []), "manifest.semantic_dedup=true"]
    if recluster:
        sets.append("semantic_dedup.recluster=true")
    _stage_command(["curated_embeddings"], "")(config, sets)


embed = app.command("embed")(
    _stage_command(
        ["dataset_manifest"],
        "Embed every image shard that has no embeddings yet (trains the bootstrap CLIP if needed).",
    )
)
train_prior_command = train_app.command("prior")(
    _stage_command(["prior"], "Train the diffusion prior (text embedding → image embedding).")
)
train_decoder_command = train_app.command("decoder")(
    _stage_command(["decoder"], "Train the diffusion decoder (image embedding → pixels).")
)
train_upsampler_command = train_app.command("upsampler")(
    _stage_command(
        ["upsampler"],
        "Train the super-resolution stage (the config's `upsampler` section) after the decoder.",
    )
)
evaluate = app.command("evaluate")(
    _stage_command(
        ["evaluation"],
        "Evaluate the trained prior and decoder: metrics JSON and a sample grid under eval/.",
    )
)


@app.command()
def status(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the latest dataset version, sources, trained runs, promoted checkpoints and recent runs."""
    from unclip.pipelines.status import status_table

    cfg, _ = load_cli_config(config, set_)
    console.print(status_table(cfg))


@app.command()
def ui(
    config: ConfigArg,
    port: Annotated[int, typer.Option(help="Port of the web UI.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    set_: SetOpt = None,
) -> None:
    """Start the Dagster UI and daemon (sensor, schedule) on this config's definitions and instance.

    The UI reads the config file and ``UNCLIP_STORAGE``; put other values in the config file.
    """
    from unclip.pipelines import ui as dagster_ui
    from unclip.pipelines.instance import dagster_home

    if set_:
        fail("`ui` takes no --set: put the values in the config file", 2)
    cfg, _ = load_cli_config(config, None)
    missing = dagster_ui.missing_distributions()
    if missing:
        fail(dagster_ui.missing_message(missing), 1)
    cmd, env = ui_command(config, cfg, port, host)
    console.print(f"Dagster UI on http://{host}:{port} (DAGSTER_HOME={dagster_home(cfg)})")
    raise typer.Exit(dagster_ui.run_until_stopped(cmd, env))


def ui_command(
    config: Path, cfg: PipelineConfig, port: int = 3000, host: str = "127.0.0.1"
) -> tuple[list[str], dict[str, str]]:
    """``dagster dev`` on ``unclip.pipelines.definitions`` with this config and instance."""
    from unclip.pipelines.instance import dagster_home
    from unclip.pipelines.ui import dev_command

    env = {
        **os.environ,
        "UNCLIP_CONFIG": str(config.resolve()),
        "DAGSTER_HOME": dagster_home(cfg),
    }
    return dev_command(port, host), env


@app.command("config-schema")
def config_schema() -> None:
    """Print the pipeline config's JSON schema (every key, type and default)."""
    import json

    console.print_json(json.dumps(PipelineConfig.model_json_schema()))


app.command()(sample)
app.command()(export)
app.command("import-embeddings")(import_embeddings_command)
app.command("export-embeddings")(export_embeddings_command)


if __name__ == "__main__":
    app()
