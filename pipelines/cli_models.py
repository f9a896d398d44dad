"""``unclip sample`` and ``unclip export``: using what was trained."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from unclip.pipelines.cli_options import ConfigArg, DeviceOpt, SetOpt, load_cli_config
from unclip.pipelines.cli_output import console, exit_on, fail


def sample(
    caption: Annotated[
        list[str] | None, typer.Argument(help="One or more captions (none with --variation etc.).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Pipeline config YAML (default: $UNCLIP_CONFIG, else ./configs/demo.yaml).",
        ),
    ] = None,
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
    latest: Annotated[
        bool,
        typer.Option(
            "--latest/--promoted", help="Sample the latest trained runs, or the promoted ones."
        ),
    ] = False,
    device: DeviceOpt = "auto",
    set_: SetOpt = None,
) -> None:
    """Generate images: CLIP text → prior → decoder → upsampler, from the promoted runs.

    Or variations of an image (--variation), an interpolation between two captions
    (--interpolate A B --frames N), or the decoding of saved image embeddings (--embedding).
    """
    from unclip.pipelines.sample_request import (
        SampleRequest,
        SampleUsageError,
        find_config,
        sample_images,
    )

    with exit_on({SampleUsageError: 2}):
        config = find_config(config)
    cfg, _ = load_cli_config(config, set_)
    request = SampleRequest(
        captions=list(caption or []),
        variation=variation,
        interpolate=interpolate,
        embedding=embedding,
        n=n,
        frames=frames,
        steps=steps,
        guidance=guidance,
        seed=seed,
        upsampler=upsampler,
        no_upsampler=no_upsampler,
        upsampler_steps=upsampler_steps,
        which="latest" if latest else "promoted",
        device=device,
    )
    with exit_on({SampleUsageError: 2, FileNotFoundError: 1}):
        images = sample_images(cfg, request)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in images:
        path = out / f"{name}.png"
        img.save(path)
        console.print(str(path))


def export(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", help="Folder to write the pipeline to.")],
    latest: Annotated[
        bool,
        typer.Option(
            "--latest/--promoted", help="Bundle the latest trained runs, or the promoted ones."
        ),
    ] = False,
    run: Annotated[
        list[str] | None,
        typer.Option(help="A named run for one model: --run decoder=RUN_NAME (repeatable)."),
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Bundle CLIP, prior, decoder (and upsampler) into one diffusers pipeline folder with a model card."""
    from unclip.pipelines.model_bundle import export_cascade

    cfg, _ = load_cli_config(config, set_)
    runs: dict[str, str] = {}
    for item in run or []:
        model, sep, name = item.partition("=")
        if not sep or not name:
            fail(f"--run {item!r}: expected MODEL=RUN_NAME", 2)
        runs[model] = name
    with exit_on({ValueError: 2, FileNotFoundError: 1}):
        folder = export_cascade(cfg, str(out), "latest" if latest else "promoted", runs)
    console.print(folder)
