"""The curate asset: semantic dedup between the embeddings and the manifest.

Wiring only: it calls ``unclip.datasets.semantic_dedup.curate`` with the pipeline's
``semantic_dedup`` section when ``manifest.semantic_dedup`` is on, and shows what the run did
(version, partitions and rows new, rows removed) as asset metadata. ``unclip curate
--recluster`` runs it with ``semantic_dedup.recluster`` set, which fits new centroids.
"""

from __future__ import annotations

import dagster as dg

from unclip.datasets import semantic_dedup
from unclip.pipelines import stages
from unclip.pipelines.resources import UnclipConfigResource

GROUP = "unclip"


@dg.asset(
    group_name=GROUP,
    deps=[dg.AssetKey("embeddings"), dg.AssetKey("clip_model")],
    code_version="1",
    description="Semantic dedup of the image embeddings against frozen k-means centroids: "
    "removal lists per shard under curation/ (a no-op unless manifest.semantic_dedup).",
)
def curated_embeddings(unclip: UnclipConfigResource) -> dg.Output:
    cfg = unclip.load()
    if not cfg.manifest.semantic_dedup:
        return dg.Output({"semantic_dedup": False}, metadata={"semantic_dedup": False})
    clip_id = stages.clip_checkpoint(cfg)["clip_id"]
    result = semantic_dedup.curate(
        stages.layout_of(cfg),
        clip_id,
        stages.source_ids(cfg),
        cfg.semantic_dedup,
        recluster=cfg.semantic_dedup.recluster,
    )
    value = {
        "semantic_dedup": True,
        "version": result.version,
        "reclustered": result.reclustered,
        "partitions_total": result.partitions_total,
        "partitions_new": result.partitions_new,
        "rows_new": result.rows_new,
        "removed_new": result.removed_new,
        "seconds": round(result.seconds, 2),
    }
    return dg.Output(value, metadata=value, data_version=dg.DataVersion(result.version))
