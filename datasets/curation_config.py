"""Config sections of curation: semantic dedup, filter recipes and the manifest that applies them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config_base import ConfigSection


class SemanticDedupConfig(ConfigSection):
    """Semantic dedup on the image embeddings: k-means clusters, then cosine inside each cluster.

    The first run freezes the centroids (a version); later partitions are assigned to them and
    compared only with the kept members of their clusters. Re-clustering (``unclip curate
    --recluster``) fits new centroids and makes a new version. ``manifest.semantic_dedup``
    turns the stage on.
    """

    similarity: float = Field(
        0.95,
        gt=0,
        le=1,
        description="Cosine similarity of image embeddings at or above which two samples are "
        "duplicates; what it removes depends on the CLIP, so measure the kept fraction per CLIP.",
    )
    cluster_size: int = Field(
        1000,
        ge=2,
        description="Average rows per cluster when the centroids are fitted (k = N / this).",
    )
    max_points_per_centroid: int = Field(
        64, ge=8, description="Rows sampled per centroid to fit k-means (faiss subsamples to this)."
    )
    iterations: int = Field(20, ge=1, description="k-means iterations.")
    seed: int = Field(0, description="Seed of k-means and of its subsample.")
    keep: Literal["highest_clip_score", "first_seen"] = Field(
        "highest_clip_score",
        description="Which sample of a duplicate group is kept: the highest CLIP score, or the "
        "first in (source, shard, row) order. Samples kept by an earlier run stay kept.",
    )
    recluster: bool = Field(
        False,
        description="Fit new centroids over every partition (a new version) instead of adding to "
        "the frozen ones; `unclip curate --recluster` sets it for one run (left on in a file, "
        "every run re-fits).",
    )


class ScoreFilter(ConfigSection):
    """Keep rows whose score passes a threshold and/or lies in the top fraction of the pool."""

    score: str = Field(
        description="A score column: 'clip_score', or 'head:NAME' for a head of manifest.heads."
    )
    min: float | None = Field(None, description="Keep rows with score >= min.")
    max: float | None = Field(None, description="Keep rows with score <= max (e.g. an NSFW head).")
    top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Keep the highest-scoring fraction of every row the manifest covers "
        "(DataComp's CLIP-score top 30%: 0.3); ties at the cutoff are kept.",
    )

    @model_validator(mode="after")
    def _known_score(self) -> ScoreFilter:
        if self.score != "clip_score" and not self.score.startswith("head:"):
            raise ValueError(f"score {self.score!r}: expected 'clip_score' or 'head:NAME'")
        return self


class FilterRecipe(ConfigSection):
    """A named set of filters applied when a manifest is made (all must pass)."""

    caption_min_words: int = Field(0, ge=0, description="Fewest whitespace-separated words.")
    caption_min_chars: int = Field(0, ge=0, description="Fewest characters (stripped).")
    min_image_side: int = Field(
        0, ge=0, description="Smallest original image side in pixels (img2dataset's original_*)."
    )
    max_aspect_ratio: float | None = Field(
        None, ge=1, description="Largest original long side / short side."
    )
    scores: list[ScoreFilter] = Field(default_factory=list, description="Score filters.")
    clusters_near: str | None = Field(
        None,
        description="A local .npy of reference image embeddings [M, D]: keep rows whose nearest "
        "semantic-dedup centroid is the nearest centroid of some reference (DataComp's "
        "image-based filtering with ImageNet as the reference). Needs semantic dedup's centroids.",
    )


def _default_recipes() -> dict[str, FilterRecipe]:
    return {
        "datacomp_basic": FilterRecipe(
            caption_min_words=2, caption_min_chars=6, min_image_side=200, max_aspect_ratio=3.0
        ),
        "clip_score_top30": FilterRecipe(
            scores=[ScoreFilter(score="clip_score", top_fraction=0.3)]
        ),
        "image_clusters_and_clip_score": FilterRecipe(
            clusters_near="reference_image_embeddings.npy",
            scores=[ScoreFilter(score="clip_score", top_fraction=0.3)],
        ),
    }


class ManifestConfig(ConfigSection):
    """Assembling the dataset manifest: which embedded samples it serves (all by default).

    The CLIP-score filter of LAION (a threshold) and DataComp (a top fraction) shapes the
    manifest only: shards are never rewritten or deleted, and changing the filter back gives
    back the earlier version.
    """

    clip_score_min: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Keep samples whose clip_score (cosine of image and caption) is >= this "
        "(LAION-400M used 0.3 with ViT-B/32).",
    )
    clip_score_top_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Keep the highest-scoring fraction of all samples of the manifest (DataComp's "
        "CLIP-score baseline keeps 0.3); ties at the cutoff are kept.",
    )
    recipe: str | None = Field(
        None, description="Name of a recipe in `recipes` applied to the manifest; None: none."
    )
    recipes: dict[str, FilterRecipe] = Field(
        default_factory=_default_recipes,
        description="Named filter recipes (DataComp's 'basic', CLIP-score top 30%, image "
        "clusters ∩ CLIP score are given); a new recipe makes a new dataset version, no re-ingest.",
    )
    heads: dict[str, str] = Field(
        default_factory=dict,
        description="Score heads over the image embeddings, name -> local .npz of a linear or "
        "small MLP head (w0, b0, w1, b1, ...; ReLU between layers, one output), e.g. LAION's "
        "aesthetic predictor; a recipe uses them as 'head:NAME'.",
    )
    semantic_dedup: bool = Field(
        False,
        description="Run the curate stage (semantic dedup, settings in `semantic_dedup`) and "
        "leave out the rows of its removal lists; shards not curated yet are left out.",
    )

    @model_validator(mode="after")
    def _recipe_known(self) -> ManifestConfig:
        if self.recipe is not None and self.recipe not in self.recipes:
            raise ValueError(
                f"manifest.recipe={self.recipe!r}: not in manifest.recipes {sorted(self.recipes)}"
            )
        for name, recipe in self.recipes.items():
            for f in recipe.scores:
                if f.score.startswith("head:") and f.score[5:] not in self.heads:
                    raise ValueError(
                        f"manifest.recipes.{name}: score {f.score!r} names no head of "
                        f"manifest.heads {sorted(self.heads)}"
                    )
        return self
