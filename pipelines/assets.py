"""Dagster assets: one per stage, wired as in DESIGN.md. Each calls a stage in ``stages.py``."""

from __future__ import annotations

from typing import Any

import dagster as dg

from unclip.pipelines import stages
from unclip.pipelines.resources import UnclipConfigResource

GROUP = "unclip"


def _output(value: dict[str, Any]) -> dg.Output:
    """Pass the stage's summary downstream and show its scalars in the UI."""
    meta = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
    return dg.Output(value, metadata=meta)


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="URL lists of the run (writes the synthetic one).",
)
def url_lists(unclip: UnclipConfigResource) -> dg.Output:
    return _output(stages.prepare_sources(unclip.load()))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="Webdataset image shards, downloaded by img2dataset in Ray tasks.",
)
def image_shards(unclip: UnclipConfigResource, url_lists: dict) -> dg.Output:
    return _output(stages.ingest(unclip.load()))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="The CLIP that embeds the data (bootstrap-trained when none is configured).",
)
def clip_model(unclip: UnclipConfigResource, image_shards: dict) -> dg.Output:
    return _output(stages.clip_checkpoint(unclip.load()))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="CLIP image and text embeddings, one Parquet per image shard.",
)
def embeddings(unclip: UnclipConfigResource, image_shards: dict, clip_model: dict) -> dg.Output:
    return _output(stages.embed(unclip.load(), clip_model["checkpoint"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="Dataset manifest (version = content hash) and embedding statistics.",
)
def dataset_manifest(unclip: UnclipConfigResource, embeddings: dict) -> dg.Output:
    return _output(stages.assemble(unclip.load(), embeddings["clip_id"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="Diffusion prior trained with Ray Train + DeepSpeed.",
)
def prior(unclip: UnclipConfigResource, dataset_manifest: dict) -> dg.Output:
    return _output(stages.train_prior(unclip.load(), dataset_manifest["version"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="Diffusion decoder trained with Ray Train + DeepSpeed.",
)
def decoder(unclip: UnclipConfigResource, dataset_manifest: dict) -> dg.Output:
    return _output(stages.train_decoder(unclip.load(), dataset_manifest["version"]))


@dg.asset(
    group_name=GROUP,
    code_version="1",
    description="Prior cosine metrics and a decoder sample grid under eval/.",
)
def evaluation(
    unclip: UnclipConfigResource,
    dataset_manifest: dict,
    clip_model: dict,
    prior: dict,
    decoder: dict,
) -> dg.Output:
    return _output(
        stages.evaluate(unclip.load(), dataset_manifest["version"], clip_model["checkpoint"])
    )


ALL_ASSETS = [
    url_lists,
    image_shards,
    clip_model,
    embeddings,
    dataset_manifest,
    prior,
    decoder,
    evaluation,
]
