"""The curate asset: semantic dedup between the embeddings and the manifest.

Wiring only: with ``manifest.semantic_dedup`` on it calls ``unclip.datasets.semantic_dedup.curate``
with the pipeline's ``semantic_dedup`` section and returns what the run did (version, partitions
and rows new, rows removed); otherwise it returns None. ``unclip curate --recluster`` runs it with
``semantic_dedup.recluster`` set, which fits new centroids into a new version.
"""

from typing import Optional

import dagster as dg

from unclip.datasets import semantic_dedup
from unclip.datasets.semantic_dedup import CurationResult
from unclip.pipelines import sources
from unclip.pipelines.resources import StorageResource, UnclipConfigResource
from unclip.pipelines.values import scalars
from unclip.training.models.clip_pin import EmbeddingClip

GROUP = "unclip"


@dg.asset(group_name=GROUP, deps=[dg.AssetKey("embeddings")], code_version="1")
def curated_embeddings(
    clip_model: EmbeddingClip, unclip: UnclipConfigResource, storage: StorageResource
) -> dg.Output[Optional[CurationResult]]:  # noqa: UP045 (Dagster reads the annotation)
    """Semantic dedup of the image embeddings against frozen k-means centroids: removal lists
    per shard under curation/ (a no-op unless manifest.semantic_dedup)."""
    cfg = storage.config(unclip)
    if not cfg.manifest.semantic_dedup:
        return dg.Output(None, metadata={"semantic_dedup": False})
    result = semantic_dedup.curate(
        storage.layout,
        clip_model.clip_id,
        list(sources.source_lists(cfg)),
        cfg.semantic_dedup,
        recluster=cfg.semantic_dedup.recluster,
    )
    return dg.Output(result, metadata=scalars(result), data_version=dg.DataVersion(result.version))
