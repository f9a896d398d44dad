"""The ``unclip`` command line: the whole pipeline, or one stage, from a YAML config."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from unclip.pipelines.cli_embeddings import export_embeddings_command, import_embeddings_command
from unclip.pipelines.config import ConfigError, PipelineConfig, load_config, parse_override

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
train_app = typer.Typer(
    help="Train one model (and whatever it needs that is missing).", no_args_is_help=True
)
app.add_typer(train_app, name="train")
console = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Pipeline config YAML, e.g. configs/demo.yaml.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a config key: --set prior.trainer.max_steps=100 (repeatable)."
    ),
]


def _load(config: Path, sets: list[str] | None) -> tuple[PipelineConfig, dict[str, Any]]:
    overrides: dict[str, Any] = {}
    for item in sets or []:
        overrides = _merge(overrides, parse_override(item))
    if os.environ.get("UNCLIP_STORAGE"):
        overrides["storage"] = os.environ["UNCLIP_STORAGE"]
    if isinstance(overrides.get("storage"), str) and "://" not in overrides["storage"]:
        # typed in a shell: relative to where the command runs, not to the config's folder
        overrides["storage"] = os.path.abspath(os.path.expanduser(overrides["storage"]))
    try:
        return load_config(config, overrides), overrides
    except ConfigError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class StageBoard:
    """A live table of stages: pending, running (with elapsed time), done or failed."""

    def __init__(self, stages: list[str]) -> None:
        self.state = {s: "pending" for s in stages}
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.runs: dict[str, int] = {}

    def __call__(self, event: str, stage: str) -> None:
        if stage not in self.state:
            return
        if event == "start":
            self.started[stage] = time.monotonic()
            self.state[stage] = "running"
            self.runs[stage] = self.runs.get(stage, 0) + 1
        else:
            # Partitioned stages run once per source: their time is the sum.
            now = time.monotonic()
            spent = now - self.started.get(stage, now)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + spent
            failed = event != "success" or self.state[stage] == "failed"
            self.state[stage] = "failed" if failed else "done"

    def __rich__(self) -> Table:
        t = Table(title="unclip pipeline", show_lines=False)
        t.add_column("stage")
        t.add_column("status")
        t.add_column("runs", justify="right")
        t.add_column("time", justify="right")
        style = {"pending": "dim", "running": "yellow", "done": "green", "failed": "red"}
        for s, st in self.state.items():
            secs = self.seconds.get(s)
            if st == "running":
                secs = (secs or 0.0) + time.monotonic() - self.started[s]
            t.add_row(
                s,
                f"[{style[st]}]{st}[/]",
                str(self.runs.get(s, "")),
                f"{secs:,.1f} s" if secs is not None else "",
            )
        return t


WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        help="Seconds to wait while another run holds the storage root's writer lease "
        "(0: stop at once, naming the holder).",
    ),
]


def _materialize(
    config: Path,
    sets: list[str] | None,
    targets: list[str] | None,
    retrain_clip: bool = False,
    wait_s: float = 0.0,
) -> dict[str, Any]:
    """Run the selected assets and everything upstream of them (no-ops where already done)."""
    from unclip.datasets.lease import LeaseHeld
    from unclip.pipelines import stages as stages_mod
    from unclip.pipelines.runner import STAGES, PipelineFailed, run_pipeline

    cfg, overrides = _load(config, sets)
    if retrain_clip and stages_mod.unpin_clip(cfg):
        console.print("unpinned the bootstrap CLIP: it retrains on every source, then re-embeds")
    stages = STAGES if targets is None else _upstream_closure(targets)
    board = StageBoard(stages)
    t0 = time.monotonic()
    try:
        with Live(board, console=console, refresh_per_second=2, transient=False):
            run = run_pipeline(
                str(config), cfg, overrides, on_event=board, stages=stages, wait_s=wait_s
            )
    except LeaseHeld as e:
        console.print(f"[red]error:[/red] storage root {cfg.storage}: {e}")
        raise typer.Exit(3) from None
    except PipelineFailed as e:
        console.print(f"[red]stage {e.stage} failed[/red] (Dagster run {e.run.run_id})\n{e}")
        raise typer.Exit(1) from None
    console.print()
    console.print(
        f"finished in {time.monotonic() - t0:,.1f} s: {len(run.run_ids)} Dagster runs over "
        f"{len(run.partitions)} source partitions ({run.dagster_home})"
    )
    return {"cfg": cfg, "run": run}


def _upstream_closure(targets: list[str]) -> list[str]:
    from unclip.pipelines.assets import ALL_ASSETS

    deps = {
        a.key.to_user_string(): {k.to_user_string() for k in a.asset_deps[a.key]}
        for a in ALL_ASSETS
    }
    seen: list[str] = []

    def visit(n: str) -> None:
        for d in sorted(deps[n]):
            visit(d)
        if n not in seen:
            seen.append(n)

    for t in targets:
        visit(t)
    order = list(deps)
    return sorted(seen, key=order.index)


def _print_outputs(cfg: PipelineConfig, outputs: dict[str, Any]) -> None:
    t = Table(title="outputs")
    t.add_column("what", no_wrap=True)
    t.add_column("where / value", overflow="fold")
    t.add_row("storage root", cfg.storage)
    if "image_shards" in outputs:
        _print_ingest_summaries(outputs["image_shards"])
    if "dataset_manifest" in outputs:
        m = outputs["dataset_manifest"]
        t.add_row(
            "dataset version",
            f"{m['version']} ({m['num_samples']} pairs, {m['num_shards']} shards)",
        )
    for model in ("clip_model", "prior", "decoder"):
        if model in outputs and outputs[model].get("run"):
            o = outputs[model]
            t.add_row(f"{model} export", o.get("export") or o.get("checkpoint"))
    if "evaluation" in outputs:
        e = outputs["evaluation"]
        if "prior_metrics" in e:
            t.add_row("prior metrics", e["prior_metrics"])
        for k in ("cos_pred_true", "cos_text_baseline"):
            if isinstance(e.get(k), (int, float)):
                t.add_row(f"  {k}", f"{e[k]:.3f}")
        if "sample_grid" in e:
            t.add_row("sample grid", e["sample_grid"])
        for k in ("decoder_metrics", "report"):
            if k in e:
                t.add_row(k.replace("_", " "), e[k])
        for k in (
            "attribute_accuracy",
            "fd_clip",
            "fd_clip_untrained",
            "clip_score",
            "clip_score_real",
        ):
            if isinstance(e.get(k), (int, float)):
                t.add_row(f"  {k}", f"{e[k]:.3f}")
    for model, d in (outputs.get("promotion") or {}).items():
        if isinstance(d, dict) and "status" in d:
            t.add_row(f"promotion {model}", f"{d['status']}: {'; '.join(d['reasons'])[:200]}")
    console.print(t)


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
    out = _materialize(config, set_, None, retrain_clip=retrain_clip, wait_s=wait)
    _print_outputs(out["cfg"], out["run"].outputs)


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
    out = _materialize(config, set_, ["image_shards"])
    _print_outputs(out["cfg"], out["run"].outputs)
    if retry_failed:
        from unclip.pipelines import stages
        from unclip.pipelines.runner import writer_lease

        with writer_lease(out["cfg"]):
            result = stages.ingest(out["cfg"], retry_failed=True)
        _print_ingest_summaries(result)


def _print_ingest_summaries(result: dict[str, Any]) -> None:
    for r in result.get("sources", []):
        if r.get("summary"):
            console.print(r["summary"])
        for w in r.get("warnings") or []:
            console.print(f"[yellow]warning:[/yellow] {w}")


@app.command()
def embed(config: ConfigArg, set_: SetOpt = None) -> None:
    """Embed every image shard that has no embeddings yet (trains the bootstrap CLIP if needed)."""
    out = _materialize(config, set_, ["dataset_manifest"])
    _print_outputs(out["cfg"], out["run"].outputs)


@train_app.command("prior")
def train_prior(config: ConfigArg, set_: SetOpt = None) -> None:
    """Train the diffusion prior (text embedding → image embedding)."""
    out = _materialize(config, set_, ["prior"])
    _print_outputs(out["cfg"], out["run"].outputs)


@train_app.command("decoder")
def train_decoder(config: ConfigArg, set_: SetOpt = None) -> None:
    """Train the diffusion decoder (image embedding → pixels)."""
    out = _materialize(config, set_, ["decoder"])
    _print_outputs(out["cfg"], out["run"].outputs)


@train_app.command("upsampler")
def train_upsampler(config: ConfigArg, set_: SetOpt = None) -> None:
    """Train the super-resolution stage (the config's `upsampler` section) after the decoder."""
    out = _materialize(config, set_, ["upsampler"])
    _print_outputs(out["cfg"], out["run"].outputs)


@app.command()
def evaluate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Evaluate the trained prior and decoder: metrics JSON and a sample grid under eval/."""
    out = _materialize(config, set_, ["evaluation"])
    _print_outputs(out["cfg"], out["run"].outputs)


@app.command()
def sample(
    caption: Annotated[
        list[str] | None, typer.Argument(help="One or more captions (none with --variation etc.).")
    ] = None,
    config: Annotated[Path, typer.Option("--config", "-c", help="Pipeline config YAML.")] = Path(
        "configs/demo.yaml"
    ),
    n: Annotated[int, typer.Option("--n", help="Images per caption / input.", min=1)] = 4,
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")] = Path("samples"),
    steps: Annotated[int | None, typer.Option(help="DDIM steps (default: from config).")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Decoder guidance scale (default: from config).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    variation: Annotated[
        Path | None,
        typer.Option(help="Variations of this image: its CLIP image embedding, decoded."),
    ] = None,
    interpolate: Annotated[
        tuple[str, str] | None,
        typer.Option(help='Interpolate between two captions: --interpolate "A" "B".'),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames of --interpolate.", min=2)] = 5,
    embedding: Annotated[
        Path | None,
        typer.Option(help="Decode image embeddings from a .npy file ([N, D] or [D])."),
    ] = None,
    upsampler: Annotated[
        Path | None,
        typer.Option(help="Upsampler export to use (default: the latest trained, if configured)."),
    ] = None,
    no_upsampler: Annotated[
        bool, typer.Option("--no-upsampler", help="Stop at the decoder's resolution.")
    ] = False,
    upsampler_steps: Annotated[
        int | None, typer.Option(help="Upsampler DDIM steps (default: from config).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Generate images: CLIP text → prior → decoder → upsampler, from the latest trained runs.

    Or variations of an image (--variation), an interpolation between two captions
    (--interpolate A B --frames N), or the decoding of saved image embeddings (--embedding).
    """
    from unclip.pipelines import stages

    cfg, _ = _load(config, set_)
    captions = list(caption or [])
    modes = [
        m
        for m, on in (
            ("captions", captions),
            ("--variation", variation),
            ("--interpolate", interpolate),
            ("--embedding", embedding),
        )
        if on
    ]
    if len(modes) != 1:
        what = " and ".join(modes) if modes else "nothing"
        _usage_error(f"give captions, --variation, --interpolate or --embedding (got {what})")
    for c in [*captions, *(interpolate or ())]:
        if not c.strip():
            _usage_error("empty caption")
    if guidance is not None and not guidance > 0:
        _usage_error(f"guidance scale must be > 0, got {guidance}")
    for name, path in (("--variation", variation), ("--embedding", embedding)):
        if path is not None and not path.is_file():
            _usage_error(f"{name} {path}: no such file")
    try:
        needs_prior = bool(captions or interpolate)
        needs_clip = needs_prior or variation is not None
        bootstrap = needs_clip and cfg.uses_bootstrap_clip
        clip_ckpt = stages.latest_export(cfg, "clip") if bootstrap else None
        prior_export = stages.latest_export(cfg, "prior") if needs_prior else ""
        decoder_export = stages.latest_export(cfg, "decoder")
        if no_upsampler:
            ups: list[str] = []
        elif upsampler is not None:
            ups = [str(upsampler)]
        else:
            ups = [stages.latest_export(cfg, "upsampler")] if cfg.upsampler is not None else []
    except FileNotFoundError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    from unclip.training import sampling

    common = {
        "steps": steps or cfg.decoder.sample_steps,
        "guidance": guidance if guidance is not None else cfg.decoder.guidance_scale,
        "seed": seed,
        "upsampler_exports": ups,
        "upsampler_steps": upsampler_steps
        or (cfg.upsampler.sample_steps if cfg.upsampler is not None else None),
    }
    try:
        if captions:
            images = sampling.generate(
                captions,
                cfg.clip,
                clip_ckpt,
                prior_export,
                decoder_export,
                n_per_caption=n,
                **common,
            )
            names = [f"{_slug(captions[i // n])}-{i % n}" for i in range(len(images))]
        elif interpolate:
            images = sampling.interpolate(
                interpolate[0],
                interpolate[1],
                frames,
                cfg.clip,
                clip_ckpt,
                prior_export,
                decoder_export,
                **common,
            )
            stem = f"{_slug(interpolate[0])}-to-{_slug(interpolate[1])}"
            names = [f"{stem}-{i:02d}" for i in range(len(images))]
        elif variation is not None:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(variation) as im:
                    source = im.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                _usage_error(f"--variation {variation}: not an image ({e})")
            images = sampling.variations(
                [source], cfg.clip, clip_ckpt, decoder_export, n_per_image=n, **common
            )
            names = [f"variation-{_slug(variation.stem)}-{i}" for i in range(len(images))]
        else:
            import numpy as np

            try:
                emb = np.load(embedding, allow_pickle=False)
            except (ValueError, OSError) as e:
                _usage_error(f"--embedding {embedding}: not a .npy array ({e})")
            images = sampling.decode_embeddings(emb, decoder_export, **common)
            names = [f"embedding-{i}" for i in range(len(images))]
    except ValueError as e:
        _usage_error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    for name, img in zip(names, images, strict=True):
        path = out / f"{name}.png"
        img.save(path)
        console.print(str(path))


def _usage_error(message: str) -> None:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(2)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:60] or "sample"


@app.command()
def status(config: ConfigArg, set_: SetOpt = None) -> None:
    """Print the latest dataset version, sources, trained runs, promoted checkpoints and recent runs."""
    from unclip.datasets.manifest import latest_manifest
    from unclip.datasets.storage import exists, read_json
    from unclip.pipelines import promotion
    from unclip.pipelines.runner import instance_for
    from unclip.pipelines.stages import layout_of, source_lists

    cfg, _ = _load(config, set_)
    layout = layout_of(cfg)
    t = Table(title=f"unclip status — {cfg.storage}")
    t.add_column("what")
    t.add_column("value", overflow="fold")
    m = latest_manifest(layout)
    t.add_row(
        "dataset version",
        f"{m['version']} ({m['num_samples']} pairs, {len(m['shards'])} shards)"
        if m
        else "[dim]none[/dim]",
    )
    known = source_lists(cfg) if exists(layout.root) else {}
    ingested = sum(exists(layout.ingest_plan(s)) for s in known)
    t.add_row("sources", f"{len(known)} registered, {ingested} ingested")
    for model in ("clip", "prior", "decoder", "upsampler"):
        p = layout.latest_run(model)
        if exists(p):
            info = read_json(p)
            t.add_row(f"latest {model}", f"{info['run']} (dataset {info.get('dataset_version')})")
        elif model != "upsampler":
            t.add_row(f"latest {model}", "[dim]none[/dim]")
    for model in cfg.promotion.models:
        rec = promotion.promoted(cfg, model)
        if rec is None:
            t.add_row(f"promoted {model}", "[dim]none[/dim]")
            continue
        shown = ", ".join(
            f"{g.metric}={rec['metrics'].get(g.metric)!s:.6}" for g in cfg.promotion.models[model]
        )
        t.add_row(
            f"promoted {model}", f"{rec['run']} (dataset {rec.get('dataset_version')}) {shown}"
        )
    instance = instance_for(cfg)
    for r in instance.get_run_records(limit=5):
        dr = r.dagster_run
        part = dr.tags.get("dagster/partition")
        t.add_row(
            "run",
            f"{dr.run_id[:8]} {dr.job_name}{f'[{part}]' if part else ''} {dr.status.value} "
            f"{r.create_timestamp:%Y-%m-%d %H:%M}",
        )
    console.print(t)


@app.command()
def ui(
    config: ConfigArg,
    port: Annotated[int, typer.Option(help="Port of the web UI.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    set_: SetOpt = None,
) -> None:
    """Start the Dagster UI and daemon (sensor, schedule) on this config's definitions and instance."""
    from unclip.pipelines import ui as dagster_ui
    from unclip.pipelines.instance import dagster_home

    cfg, overrides = _load(config, set_)
    if overrides:
        console.print("[red]error:[/red] `ui` takes no --set: put the values in the config file")
        raise typer.Exit(2)
    missing = dagster_ui.missing_distributions()
    if missing:
        console.print(f"[red]error:[/red] {dagster_ui.missing_message(missing)}", soft_wrap=True)
        raise typer.Exit(1)
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


app.command("import-embeddings")(import_embeddings_command)
app.command("export-embeddings")(export_embeddings_command)


if __name__ == "__main__":
    app()
