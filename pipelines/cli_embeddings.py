"""``unclip import-embeddings`` and ``unclip export-embeddings``: precomputed CLIP embeddings in and out.

Import files clip-retrieval's npy layout or DataComp's npz under the CLIP id of the model name
and pretrained tag given, then assembles a dataset manifest over that CLIP's imported sources,
which the prior trains on without re-embedding. Export writes a dataset version's embeddings in
clip-retrieval's layout.
"""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from unclip.pipelines.cli_options import ConfigArg, SetOpt


def import_embeddings_command(
    config: ConfigArg,
    uri: Annotated[
        str, typer.Argument(help="Folder (local or fsspec URI) holding the embeddings.")
    ],
    model: Annotated[str, typer.Option(help="open_clip model name they were made with.")],
    pretrained: Annotated[str, typer.Option(help="open_clip pretrained tag of that model.")],
    fmt: Annotated[
        Literal["clip-retrieval", "datacomp"],
        typer.Option(
            "--format", help="clip-retrieval: img_emb/ text_emb/ metadata/; datacomp: npz."
        ),
    ] = "clip-retrieval",
    source: Annotated[str | None, typer.Option(help="Source name (default: a hash).")] = None,
    caption_col: Annotated[str, typer.Option(help="Metadata column of captions.")] = "caption",
    url_col: Annotated[str, typer.Option(help="Metadata column of image URLs.")] = "url",
    rows_per_shard: Annotated[int, typer.Option(help="Rows per embedding file.", min=1)] = 65536,
    image_key: Annotated[str, typer.Option(help="npz array of image embeddings.")] = "l14_img",
    text_key: Annotated[str, typer.Option(help="npz array of text embeddings.")] = "l14_txt",
    set_: SetOpt = None,
) -> None:
    """Import precomputed CLIP embeddings (LAION's, DataComp's) and assemble a manifest over them."""
    from unclip.datasets import manifest as manifest_mod
    from unclip.datasets.embedding_import import ImportSpec, import_embeddings, imported_sources
    from unclip.datasets.storage import StorageLayout
    from unclip.pipelines.cli_options import load_cli_config
    from unclip.pipelines.cli_output import console, exit_on

    cfg, _ = load_cli_config(config, set_)
    layout = StorageLayout(cfg.storage)
    spec = ImportSpec(
        uri,
        fmt,
        model,
        pretrained,
        source,
        caption_col,
        url_col,
        rows_per_shard,
        image_key,
        text_key,
    )
    with exit_on({FileNotFoundError: 1, ValueError: 1, KeyError: 1}):
        record = import_embeddings(layout, spec)
    sources = imported_sources(layout, record["clip_id"])
    m = manifest_mod.assemble_manifest(layout, record["clip_id"], sources, cfg=cfg.manifest)
    console.print(
        f"imported {record['num_samples']} pairs from {uri} as source {record['source']} "
        f"(CLIP {record['clip_id']} = {model} / {pretrained}, {len(record['shards'])} files); "
        f"dataset version {m['version']}: {m['num_samples']} pairs over {len(sources)} imported "
        "source(s), for the prior (the decoder needs image shards)"
    )


def export_embeddings_command(
    config: ConfigArg,
    out: Annotated[str, typer.Argument(help="Folder (local or fsspec URI) to write.")],
    version: Annotated[
        str | None, typer.Option(help="Dataset version (default: the latest manifest).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Write a dataset version's embeddings in clip-retrieval's layout (embedding-reader reads it)."""
    from unclip.datasets.embedding_export import export_embeddings
    from unclip.datasets.manifest import latest_manifest
    from unclip.datasets.storage import StorageLayout
    from unclip.pipelines.cli_options import load_cli_config
    from unclip.pipelines.cli_output import console, exit_on, fail

    cfg, _ = load_cli_config(config, set_)
    layout = StorageLayout(cfg.storage)
    latest = latest_manifest(layout)
    if version is None and latest is None:
        fail(f"no dataset manifest under {cfg.storage}: give --version", 1)
    with exit_on({FileNotFoundError: 1, ValueError: 1}):
        record = export_embeddings(layout, version or latest["version"], out)
    console.print(
        f"exported {record['num_samples']} pairs of dataset {record['version']} "
        f"({len(record['parts'])} parts, D={record['embedding_dim']}) to {out}"
    )
