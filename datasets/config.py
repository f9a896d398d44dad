"""Typed config sections owned by ``unclip.datasets``; ``unclip.pipelines.config`` composes them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """Base for every config section: unknown keys are an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticConfig(Section):
    """The captioned-shapes demo data set, generated deterministically and served on loopback."""

    num_pairs: int = Field(2000, ge=1, description="Number of (image URL, caption) pairs.")
    image_size: int = Field(
        96, ge=16, description="Side of the generated images, before ingest resizes them."
    )
    seed: int = Field(
        0, description="Seed: the same seed gives byte-identical images and captions."
    )
    colors: list[str] = Field(
        default_factory=lambda: ["red", "green", "blue", "yellow", "purple", "orange"],
        description="Colour names used in images and captions.",
    )
    shapes: list[str] = Field(
        default_factory=lambda: ["circle", "square", "triangle"],
        description="Shapes drawn: circle, square, triangle.",
    )


class IngestConfig(Section):
    """How URL lists become webdataset shards (img2dataset inside Ray tasks)."""

    url_col: str = Field("url", description="Column of the URL list holding image URLs.")
    caption_col: str = Field("caption", description="Column holding captions.")
    image_size: int = Field(64, ge=8, description="Output side in pixels.")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(95, ge=1, le=100)
    samples_per_shard: int = Field(1000, ge=1, description="URLs per shard (one Ray task each).")
    thread_count: int = Field(16, ge=1, description="Download threads inside each shard task.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout.")
    retries: int = Field(0, ge=0, description="img2dataset's per-URL retries.")
    shard_retries: int = Field(2, ge=0, description="Ray-level retries of a failed shard task.")
    allow_private_networks: bool = Field(
        False, description="Permit URLs on loopback/private addresses (the demo and tests set it)."
    )


class ClipConfig(Section):
    """Which CLIP embeds the data: a pretrained open_clip model, or a bootstrap one trained here.

    With ``pretrained`` unset, a small model of this architecture is trained on the ingested
    pairs (see ``unclip.training`` and the ``bootstrap`` section of the pipeline config).
    """

    model_name: str | None = Field(
        None,
        description="open_clip model name (e.g. 'ViT-B-32'); None uses the bootstrap architecture.",
    )
    pretrained: str | None = Field(
        None, description="open_clip tag, 'hf-hub:org/name', or a local checkpoint path."
    )
    # Bootstrap architecture (used when model_name is None).
    embed_dim: int = Field(64, ge=8)
    image_size: int = Field(64, ge=8)
    patch_size: int = Field(8, ge=1)
    vision_width: int = Field(128, ge=8)
    vision_layers: int = Field(3, ge=1)
    text_width: int = Field(128, ge=8)
    text_layers: int = Field(3, ge=1)
    heads: int = Field(4, ge=1)
    context_length: int = Field(16, ge=4)


class EmbedConfig(Section):
    """The embedding stage: CLIP over every image shard, into Parquet."""

    batch_size: int = Field(256, ge=1)
    device: Literal["cpu", "cuda"] = "cpu"
    num_actors: int = Field(1, ge=1, description="Encoder actors in the Ray Data pool.")
