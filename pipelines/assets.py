"""Dagster assets: one per stage, wired as in DESIGN.md. Each calls a stage in ``stages.py``.

Source-level assets (``url_lists``, ``image_shards``, ``embeddings``) are partitioned by source
(dynamic partitions named ``sources``; key = the list's source id). The rest are unpartitioned
and depend on every partition. Assets find their inputs on the storage root rather than in
Dagster's IO manager, so a run on one machine can follow a run on another.

Code versions: ``code_version`` is the version of what the asset's stage writes. Bump it in the
commit that changes that output for the same inputs; Dagster then marks the asset and
everything downstream of it as changed, and "Materialize changed and missing" redoes only
those. Stages name their outputs by content hashes, so a re-materialized asset whose inputs did
not change still skips its work.
"""

import warnings
from typing import Any

import dagster as dg
from dagster import AssetExecutionContext

from unclip.pipelines import promotion as promotion_mod
from unclip.pipelines import stages
from unclip.pipelines.curation_assets import curated_embeddings
from unclip.pipelines.reevaluate import reevaluator
from unclip.pipelines.resources import UnclipConfigResource

GROUP = "unclip"
SOURCES = dg.DynamicPartitionsDefinition(name="sources")


def _output(value: dict[str, Any], data_version: str | None = None) -> dg.Output:
    """Pass the stage's summary on and show its scalars in the UI."""
    meta = {k: v for k, v in value.items() if isinstance(v, (int, float, str, bool))}
    with warnings.catch_warnings():  # `data_version` is beta in Dagster 1.13: one warning per stage
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(
            value,
            metadata=meta,
            data_version=dg.DataVersion(data_version) if data_version else None,
        )


@dg.asset(
    group_name=GROUP,
    partitions_def=SOURCES,
    code_version="2",
    description="One URL list (one source), checked as ingest will read it.",
)
def url_lists(context: AssetExecutionContext, unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    stages.prepare_sources(cfg)  # the synthetic list, when its partition runs first
    return _output(stages.describe_source(cfg, context.partition_key), context.partition_key)


@dg.asset(
    group_name=GROUP,
    partitions_def=SOURCES,
    deps=[url_lists],
    code_version="2",
    description="Webdataset image shards of one source, downloaded by img2dataset in Ray tasks.",
)
def image_shards(context: AssetExecutionContext, unclip: UnclipConfigResource) -> dg.Output:
    return _output(stages.ingest(unclip.load(), only=[context.partition_key]))


@dg.asset(
    group_name=GROUP,
    deps=[image_shards],
    code_version="2",
    description="The CLIP that embeds the data: pretrained, or the bootstrap one, trained once "
    "on the sources ingested first and then pinned (runs/clip/latest.json).",
)
def clip_model(unclip: UnclipConfigResource) -> dg.Output:
    out = stages.clip_checkpoint(unclip.load())
    return _output(out, out.get("clip_id"))


@dg.asset(
    group_name=GROUP,
    partitions_def=SOURCES,
    deps=[image_shards, clip_model],
    code_version="2",
    description="CLIP image and text embeddings of one source, one Parquet per image shard.",
)
def embeddings(context: AssetExecutionContext, unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    clip = stages.clip_checkpoint(cfg)  # the pinned CLIP: never retrained for a new source
    return _output(stages.embed(cfg, clip["checkpoint"], only=[context.partition_key]))


@dg.asset(
    group_name=GROUP,
    deps=[embeddings, clip_model, curated_embeddings],
    code_version="3",
    description="Dataset manifest over every source (version = content hash), filter recipe "
    "and semantic dedup applied, and statistics.",
)
def dataset_manifest(unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    out = stages.assemble(cfg, stages.clip_checkpoint(cfg)["clip_id"])
    return _output(out, out["version"])


@dg.asset(
    group_name=GROUP,
    deps=[dataset_manifest],
    code_version="2",
    description="Diffusion prior trained with Ray Train + DeepSpeed (resumes; skips when done).",
)
def prior(unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    out = stages.train_prior(cfg, stages.current_version(cfg))
    return _output(out, out["run"])


@dg.asset(
    group_name=GROUP,
    deps=[dataset_manifest],
    code_version="2",
    description="Diffusion decoder trained with Ray Train + DeepSpeed (resumes; skips when done).",
)
def decoder(unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    out = stages.train_decoder(cfg, stages.current_version(cfg))
    return _output(out, out["run"])


@dg.asset(
    group_name=GROUP,
    deps=[dataset_manifest, decoder],
    code_version="1",
    description="Super-resolution upsampler after the decoder (a no-op without an `upsampler` "
    "section in the config).",
)
def upsampler(unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    out = stages.train_upsampler(cfg, stages.current_version(cfg))
    return _output(out, out.get("run") or "none")


@dg.asset(
    group_name=GROUP,
    deps=[dataset_manifest, clip_model, prior, decoder, upsampler],
    code_version="2",
    description="Prior metrics, decoder metrics and samples under eval/{run}/.",
)
def evaluation(unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    clip = stages.clip_checkpoint(cfg)
    return _output(stages.evaluate(cfg, stages.current_version(cfg), clip["checkpoint"]))


@dg.asset(
    group_name=GROUP,
    deps=[evaluation],
    code_version="1",
    description="Promotion gate: registry/{model}.json moves only when the evaluation wins.",
)
def promotion(context: AssetExecutionContext, unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    out: dict[str, Any] = {}
    for model in cfg.promotion.models:
        if model == "upsampler" and cfg.upsampler is None:
            continue
        d = promotion_mod.promote(cfg, model, reevaluate=reevaluator(cfg))
        out[model] = d
        (context.log.info if d["promote"] else context.log.warning)(
            f"{model} {d.get('run')}: {d['status']}; " + "; ".join(d["reasons"])
        )
    value = {**out, **{f"{m}_status": d["status"] for m, d in out.items()}}
    return _output(value)


SOURCE_ASSETS = [url_lists, image_shards, embeddings]
INGEST_ASSETS = [url_lists, image_shards]
TRAIN_ASSETS = [
    curated_embeddings,
    dataset_manifest,
    prior,
    decoder,
    upsampler,
    evaluation,
    promotion,
]
ALL_ASSETS = [
    url_lists,
    image_shards,
    clip_model,
    embeddings,
    curated_embeddings,
    dataset_manifest,
    prior,
    decoder,
    upsampler,
    evaluation,
    promotion,
]
