"""Dagster assets: one per stage, wired as in docs/architecture.md.

Each asset takes its resources (config, storage root, Ray) and the typed values of the assets
upstream of it, calls the function of ``unclip.datasets`` or ``unclip.training`` that does the
stage, and returns a typed value (``values.py``) that the IO manager keeps on the storage root.

Source-level assets (``url_lists``, ``image_shards``, ``embeddings``) are partitioned by source
(dynamic partitions named ``sources``; key = the list's source id). The rest are unpartitioned
and depend on every partition.

Code versions: ``code_version`` is the version of what the asset's stage writes. Bump it in the
commit that changes that output for the same inputs; Dagster then marks the asset and
everything downstream of it as changed, and "Materialize changed and missing" redoes only
those. Stages name their outputs by content hashes, so a re-materialized asset whose inputs did
not change still skips its work.
"""

import functools
import importlib
import warnings
from typing import Any, Optional

import dagster as dg
from dagster import AssetExecutionContext
from pydantic import Field

from unclip.datasets import ingest, manifest, readers, synthetic
from unclip.datasets.embedding_shards import embedded_source
from unclip.datasets.served_rows import require_images
from unclip.pipelines import promotion as promotion_gate
from unclip.pipelines import sources
from unclip.pipelines.curation_assets import curated_embeddings
from unclip.pipelines.reevaluate import reevaluator
from unclip.pipelines.resources import RayResource, StorageResource, UnclipConfigResource
from unclip.pipelines.status import kept_by_filter
from unclip.pipelines.ui_metadata import evaluation_metadata, promotion_metadata
from unclip.pipelines.values import (
    DatasetVersion,
    EmbedSummary,
    IngestSummary,
    PromotionOutcome,
    SourceList,
    scalars,
)
from unclip.training.engine.fit_result import FitResult
from unclip.training.engine.latest_runs import record_latest
from unclip.training.evaluation.trained_cascade import (
    CascadeEvaluation,
    TrainedCascade,
    evaluate_trained_cascade,
)
from unclip.training.models.clip_pin import EmbeddingClip, embedding_clip
from unclip.training.models.run_names import finished_manifest_run

GROUP = "unclip"
SOURCES = dg.DynamicPartitionsDefinition(name="sources")
# Every asset is in one group; its docstring is its description in the UI.
stage_asset = functools.partial(dg.asset, group_name=GROUP)
# The assets of one source (URL list), one partition each.
source_asset = functools.partial(stage_asset, partitions_def=SOURCES)


def _output(
    value: Any, data_version: str | None = None, metadata: dict[str, Any] | None = None
) -> dg.Output:
    """Pass the typed value on and show its scalars (or ``metadata``) in the UI."""
    with warnings.catch_warnings():  # `data_version` is beta in Dagster 1.13: one warning per stage
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(
            value,
            metadata=scalars(value) if metadata is None else metadata,
            data_version=dg.DataVersion(data_version) if data_version else None,
        )


class IngestRun(dg.Config):
    """How one source's ingest runs."""

    retry_failed: bool = Field(
        False, description="Also re-download failed samples of finished shards (into new shards)."
    )


@source_asset(code_version="2")
def url_lists(
    context: AssetExecutionContext, unclip: UnclipConfigResource, storage: StorageResource
) -> dg.Output[SourceList]:
    """One URL list (one source), checked as ingest will read it."""
    cfg = storage.config(unclip)
    sources.write_synthetic_list(cfg)  # the synthetic list, when its partition runs first
    path = sources.url_list_of(cfg, context.partition_key)
    checked = sources.validate(
        path, cfg, sources.ingest_config_of(cfg, context.partition_key, path)
    )
    return _output(SourceList(context.partition_key, path, checked.rows), context.partition_key)


@source_asset(code_version="2")
def image_shards(
    context: AssetExecutionContext,
    url_lists: SourceList,
    config: IngestRun,
    unclip: UnclipConfigResource,
    storage: StorageResource,
    ray: RayResource,  # Ray starts inside ingest, only when shards are missing
) -> dg.Output[IngestSummary]:
    """Webdataset image shards of one source, downloaded by img2dataset in Ray tasks."""
    cfg, sid, path = storage.config(unclip), context.partition_key, url_lists.url_list
    ingest_cfg = sources.ingest_config_of(cfg, sid, path)  # the source's own columns and filters
    results = []
    missing = not ingest.source_ingested(storage.layout, sid)
    if missing or config.retry_failed:
        with sources.serving_images(cfg, path):
            if missing:
                results.append(ingest.ingest_source(storage.layout, path, ingest_cfg))
            if config.retry_failed:
                results.append(ingest.retry_failed(storage.layout, sid, ingest_cfg))
    for r in results:
        r.raise_for_failed_shards()
    return _output(IngestSummary.of(sid, results))


@stage_asset(deps=[image_shards], code_version="2")
def clip_model(
    unclip: UnclipConfigResource, storage: StorageResource, ray: RayResource
) -> dg.Output[EmbeddingClip]:
    """The CLIP that embeds the data: pretrained, or the bootstrap one, trained once on the
    sources ingested first and then pinned (runs/clip/latest.json)."""
    cfg, layout = storage.config(unclip), storage.layout
    clip = embedding_clip(
        layout,
        cfg.clip,
        cfg.bootstrap,
        cfg.evaluate.holdout_fraction,
        ingested_sources=lambda: [
            s for s in sources.source_lists(cfg) if ingest.source_ingested(layout, s)
        ],
    )
    return _output(clip, clip.clip_id)


@source_asset(deps=[image_shards], code_version="2")
def embeddings(
    context: AssetExecutionContext,
    clip_model: EmbeddingClip,
    unclip: UnclipConfigResource,
    storage: StorageResource,
    ray: RayResource,
) -> dg.Output[EmbedSummary]:
    """CLIP image and text embeddings of one source, one Parquet per image shard."""
    cfg, sid = storage.config(unclip), context.partition_key
    r = embedded_source(storage.layout, sid, clip_model.clip_id)
    if r is None:  # open_clip and torch load only when there are shards to embed
        from unclip.datasets import embed

        r = embed.embed_source(storage.layout, sid, cfg.clip, clip_model.checkpoint, cfg.embed)
    return _output(EmbedSummary(sid, r.clip_id, r.shards_written, r.shards_skipped))


@stage_asset(deps=[embeddings, curated_embeddings], code_version="3")
def dataset_manifest(
    clip_model: EmbeddingClip, unclip: UnclipConfigResource, storage: StorageResource
) -> dg.Output[DatasetVersion]:
    """Dataset manifest over every source (version = content hash), the filter recipe and
    semantic dedup's removal lists applied, and statistics."""
    cfg = storage.config(unclip)
    ids = list(sources.source_lists(cfg))
    m = manifest.assemble_manifest(storage.layout, clip_model.clip_id, ids, cfg=cfg.manifest)
    value = DatasetVersion(m["version"], m["num_samples"], len(m["shards"]), m["embedding_dim"])
    return _output(value, value.version, {**scalars(value), **kept_by_filter(storage.layout, m)})


def _training_asset(
    model: str, what: str, code_version: str, deps: list[Any] | None = None
) -> dg.AssetsDefinition:
    """The asset of one model trained on the dataset version: ``train_{model}`` of
    ``unclip.training.models.{model}``, imported when the asset runs (torch loads then).

    Its value is the finished run (``FitResult``), or None when the config has no section for
    the model (the upsampler is optional).
    """

    @stage_asset(
        name=model,
        deps=deps,
        code_version=code_version,
        description=f"{what} trained with Ray Train + DeepSpeed (resumes; skips when done).",
    )
    def trained(
        dataset_manifest: DatasetVersion,
        unclip: UnclipConfigResource,
        storage: StorageResource,
        ray: RayResource,
    ) -> dg.Output[Optional[FitResult]]:  # noqa: UP045 (Dagster reads the annotation)
        cfg = storage.config(unclip)
        section = getattr(cfg, model)
        if section is None:
            return _output(None, "none")
        if (
            model != "prior"
        ):  # image models: refuse embeddings-only sources before any worker starts
            require_images(readers.load_manifest(storage.layout, dataset_manifest.version))
        version, holdout = dataset_manifest.version, cfg.evaluate.holdout_fraction
        fit = finished_manifest_run(storage.layout, model, section, holdout, version)
        if fit is None:  # torch loads with the model's module, only when there is work
            train = getattr(
                importlib.import_module(f"unclip.training.models.{model}"), f"train_{model}"
            )
            fit = train(storage.layout, version, section, holdout)
        record_latest(storage.layout, model, fit, dataset_manifest.version)
        return _output(fit, fit.run_name)

    return trained


prior = _training_asset("prior", "Diffusion prior", code_version="2")
decoder = _training_asset("decoder", "Diffusion decoder", code_version="2")
upsampler = _training_asset(
    "upsampler",
    "Super-resolution upsampler after the decoder (a no-op without an `upsampler` section)",
    code_version="1",
    deps=[decoder],
)


@stage_asset(code_version="2")
def evaluation(
    dataset_manifest: DatasetVersion,
    clip_model: EmbeddingClip,
    prior: FitResult,
    decoder: FitResult,
    upsampler: Optional[FitResult],  # noqa: UP045 (Dagster reads the annotation)
    unclip: UnclipConfigResource,
    storage: StorageResource,
    ray: RayResource,
) -> dg.Output[CascadeEvaluation]:
    """Prior metrics, cascade metrics, samples and report under eval/{run}/."""
    cfg = storage.config(unclip)
    palette = synthetic.color_palette(cfg.synthetic) if cfg.synthetic is not None else None
    result = evaluate_trained_cascade(
        storage.layout,
        dataset_manifest.version,
        (cfg.clip, clip_model.checkpoint),
        TrainedCascade(prior, decoder, upsampler if cfg.upsampler is not None else None),
        (cfg.prior, cfg.decoder, cfg.evaluate),
        cfg.evaluate.holdout_fraction,
        palette,
    )
    return _output(result, metadata=evaluation_metadata(result))


@stage_asset(deps=[evaluation], code_version="1")
def promotion(
    context: AssetExecutionContext,
    unclip: UnclipConfigResource,
    storage: StorageResource,
    ray: RayResource,
) -> dg.Output[list[PromotionOutcome]]:
    """Promotion gate: registry/{model}.json moves only when the evaluation wins."""
    cfg = storage.config(unclip)
    outcomes = []
    for model in cfg.promotion.models:
        if model == "upsampler" and cfg.upsampler is None:
            continue
        d = promotion_gate.promote(cfg, model, reevaluate=reevaluator(cfg))
        outcomes.append(
            PromotionOutcome(model, d.get("run"), d["status"], d["promote"], d["reasons"])
        )
        (context.log.info if d["promote"] else context.log.warning)(
            f"{model} {d.get('run')}: {d['status']}; " + "; ".join(d["reasons"])
        )
    return _output(outcomes, metadata=promotion_metadata(outcomes))


SOURCE_ASSETS = [url_lists, image_shards, embeddings]
TRAIN_ASSETS = [
    curated_embeddings,
    dataset_manifest,
    prior,
    decoder,
    upsampler,
    evaluation,
    promotion,
]
ALL_ASSETS = [url_lists, image_shards, clip_model, embeddings, *TRAIN_ASSETS]
