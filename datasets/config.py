"""Typed config sections owned by ``unclip.datasets``; ``unclip.pipelines.config`` composes them."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import Field, model_validator

from .config_base import IDENTITY_UNLESS_DEFAULT, ConfigSection, IdentitySection
from .curation_config import (
    FilterRecipe,
    ManifestConfig,
    ScoreFilter,
    SemanticDedupConfig,
)
from .synthetic_config import RELATIONS, CompositionalConfig, SyntheticConfig

__all__ = [
    "RELATIONS",
    "ClipConfig",
    "CompositionalConfig",
    "EmbedConfig",
    "FilterConfig",
    "FilterRecipe",
    "IngestConfig",
    "ManifestConfig",
    "MetadataRule",
    "ScoreFilter",
    "ConfigSection",
    "SemanticDedupConfig",
    "SyntheticConfig",
]


class MetadataRule(ConfigSection):
    """Bounds on a numeric column of the URL list; a row outside them is removed before download."""

    min: float | None = Field(None, description="Keep rows with value >= min.")
    max: float | None = Field(None, description="Keep rows with value <= max.")
    gt: float | None = Field(None, description="Keep rows with value > gt.")
    lt: float | None = Field(None, description="Keep rows with value < lt (punsafe: {lt: 0.5}).")
    keep_missing: bool = Field(False, description="Keep rows whose value is null.")


class FilterConfig(ConfigSection):
    """Which samples ingest keeps. Each filter counts its removals, per shard and in total.

    Caption, metadata and (url, caption) dedup filters run in the driver before download; the
    image filters run in the shard task after download, before an image is decoded in full.
    """

    # --- image (after download) ---
    min_image_size: int = Field(0, ge=0, description="Smallest allowed side in pixels.")
    max_aspect_ratio: float | None = Field(
        None, ge=1, description="Largest allowed long side / short side."
    )
    max_image_area: int = Field(
        89_478_485,
        ge=1,
        description="Largest allowed width × height, checked from the header before decoding "
        "(decompression bombs); the default is PIL's limit.",
    )
    dedup_image_sha256: bool = Field(
        True, description="Drop an image whose bytes' sha256 already occurred in the shard."
    )
    phash_max_distance: int | None = Field(
        None,
        ge=0,
        le=31,
        description="Drop an image whose 64-bit perceptual hash (pHash of the resized image) is "
        "within this many bits of an image kept earlier in the shard or in the source's "
        "committed earlier shards (10 catches re-encodes, resizes, colour shifts and most "
        "1-4 px crops of photos, see benchmarks/dedup.py). None: no perceptual dedup (the pHash column is written anyway). "
        "Flat synthetic shapes collide perceptually: keep it off for the demo.",
    )
    # --- caption (before download) ---
    caption_min_chars: int = Field(1, ge=0, description="Fewest characters (stripped).")
    caption_max_chars: int | None = Field(None, ge=1, description="Most characters (stripped).")
    caption_min_words: int = Field(0, ge=0, description="Fewest whitespace-separated words.")
    caption_max_words: int | None = Field(None, ge=1, description="Most words.")
    caption_scripts: list[str] | None = Field(
        None,
        description="Unicode scripts a caption must be written in, as the first word of the "
        "characters' Unicode names (e.g. ['LATIN'], ['CJK', 'HIRAGANA', 'KATAKANA']).",
    )
    caption_min_script_fraction: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Fraction of a caption's letters that must be in those scripts.",
    )
    # --- metadata and dedup (before download) ---
    metadata: dict[str, MetadataRule] = Field(
        default_factory=dict,
        description="Thresholds on list columns, e.g. {punsafe: {lt: 0.5}, pwatermark: {lt: 0.8}}; "
        "a rule on a column the list lacks is skipped (and reported).",
    )
    dedup_url_caption: bool = Field(
        True,
        description="Drop rows whose 128-bit (url, caption) hash occurred earlier in the list or "
        "in any source ingested before.",
    )


class IngestConfig(ConfigSection):
    """How URL lists become webdataset shards (img2dataset inside Ray tasks)."""

    url_col: str = Field("url", description="Column of the URL list holding image URLs.")
    caption_col: str = Field("caption", description="Column holding captions.")
    list_format: Literal["parquet", "csv", "tsv", "jsonl"] | None = Field(
        None,
        description="Format of the URL lists (+ .gz by name); None: from each file's extension.",
    )
    list_columns: list[str] | None = Field(
        None,
        description="Column names of header-less csv / tsv lists (CC3M's TSV: [caption, url]); "
        "None: the first line is the header.",
    )
    max_url_list_bytes: int = Field(
        4 * 1024**3,
        ge=1,
        description="Largest URL list read, in bytes after decompression (a .gz is "
        "decompressed in a stream and refused past this).",
    )
    image_size: int = Field(64, ge=8, description="Output side in pixels.")
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(
        95, ge=0, le=100, description="jpg / webp quality 1-100; for png the compression level 0-9."
    )
    samples_per_shard: int = Field(1000, ge=1, description="URLs per shard (one Ray task each).")
    thread_count: int = Field(16, ge=1, description="Download threads inside each shard task.")
    timeout_s: float = Field(10.0, gt=0, description="Per-request timeout.")
    retries: int = Field(0, ge=0, description="img2dataset's per-URL retries.")
    shard_retries: int = Field(2, ge=0, description="Ray-level retries of a failed shard task.")
    shard_deadline_s: float | None = Field(
        None,
        gt=0,
        description="Wall-clock limit of one try of a shard, counted once its download process has "
        "loaded; past it the process is killed, the try fails and Ray retries the shard (nothing "
        "partial is committed); the driver's wait is bounded from it too. None: no limit.",
    )
    allow_private_networks: bool = Field(
        False, description="Permit URLs on loopback/private addresses (the demo and tests set it)."
    )
    allowed_networks: list[str] = Field(
        default_factory=list,
        description="CIDRs downloads may reach although they are not public (e.g. an internal "
        "image CDN, ['10.20.0.0/16']); every other non-public address stays refused.",
    )
    proxy: str | None = Field(
        None,
        description="HTTP proxy (http://host:port) for every download; each target host is still "
        "checked before it is sent to the proxy. None: direct (environment proxies are never used).",
    )
    max_redirects: int = Field(
        5, ge=0, le=50, description="Redirects followed per request (at most 50)."
    )
    max_image_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Largest response body accepted per image."
    )
    max_buffered_bytes: int = Field(
        2 * 1024**3,
        ge=1,
        description="Cap on response bodies a shard task holds at once: img2dataset keeps up to "
        "2 × thread_count bodies of up to max_image_bytes each, and a config over the cap is refused.",
    )
    max_request_time_s: float = Field(
        60.0,
        gt=0,
        description="Wall-clock limit per request, from DNS to the last byte (connect, status "
        "line, headers, redirects and body included).",
    )
    disallowed_header_directives: list[str] = Field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that opt an image out (img2dataset's defaults).",
    )
    failure_warn_rate: float = Field(
        0.2, ge=0, le=1, description="Warn (with the top errors) above this failure rate."
    )
    filters: FilterConfig = FilterConfig()

    @model_validator(mode="after")
    def _check_quality(self) -> IngestConfig:
        if self.encode_format == "png" and self.encode_quality > 9:
            raise ValueError(
                f"ingest.encode_quality={self.encode_quality}: for encode_format 'png' it is the "
                "compression level, 0-9"
            )
        held = 2 * self.thread_count * self.max_image_bytes
        if held > self.max_buffered_bytes:
            raise ValueError(
                f"ingest: 2 × thread_count ({self.thread_count}) × max_image_bytes "
                f"({self.max_image_bytes}) = {held} bytes may be buffered per shard task, over "
                f"ingest.max_buffered_bytes={self.max_buffered_bytes}: lower one of them"
            )
        for net in self.allowed_networks:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError as e:
                raise ValueError(f"ingest.allowed_networks: {net!r} is not a CIDR ({e})") from None
        if self.proxy is not None and not self.proxy.startswith(("http://", "https://")):
            raise ValueError(f"ingest.proxy={self.proxy!r}: expected http://host:port")
        return self


class SourceConfig(ConfigSection):
    """One entry of ``sources:`` written as an object: a URL list or a glob of them, read its way.

    A glob (``*``, ``?``, ``[``; local or any fsspec URI) is one source per matched file. Keys left
    unset take the ``ingest`` section's value.
    """

    path: str = Field(..., description="A URL list, or a glob matching several (one source each).")
    format: Literal["parquet", "csv", "tsv", "jsonl"] | None = Field(
        None, description="Format of the list(s); None: ingest.list_format, else the extension."
    )
    url_col: str | None = Field(
        None, description="Column holding image URLs (None: ingest.url_col)."
    )
    caption_col: str | None = Field(
        None, description="Column holding captions (None: ingest.caption_col)."
    )
    columns: list[str] | None = Field(
        None,
        description="Column names of a header-less csv / tsv (None: ingest.list_columns).",
    )
    metadata: dict[str, MetadataRule] | None = Field(
        None,
        description="Thresholds on this list's columns, e.g. {punsafe: {lt: 0.5}}; None: "
        "ingest.filters.metadata.",
    )

    def options(self) -> dict[str, object]:
        """The keys set besides ``path``, as JSON-able data (what a registered source records)."""
        return self.model_dump(exclude={"path"}, exclude_none=True)

    def ingest_config(self, base: IngestConfig) -> IngestConfig:
        """``base`` with this source's column mapping, format and metadata filters applied."""
        return ingest_config_with(base, self.options())


def ingest_config_with(base: IngestConfig, options: dict[str, object]) -> IngestConfig:
    """``base`` with a source's recorded options (:meth:`SourceConfig.options`) applied."""
    opts = SourceConfig.model_validate({"path": "-", **options})
    update: dict[str, object] = {}
    pairs = (
        ("format", "list_format"),
        ("url_col", "url_col"),
        ("caption_col", "caption_col"),
        ("columns", "list_columns"),
    )
    for key, field in pairs:
        if getattr(opts, key) is not None:
            update[field] = getattr(opts, key)
    if opts.metadata is not None:
        update["filters"] = base.filters.model_copy(update={"metadata": opts.metadata})
    return base.model_copy(update=update) if update else base


_BOOT = "Bootstrap only (clip.model_name unset):"


class ClipConfig(IdentitySection):
    """Which CLIP embeds the data: a pretrained open_clip model, or a bootstrap one trained here.

    With ``pretrained`` unset, a small model of this architecture is trained on the ingested
    pairs (see ``unclip.training`` and the ``bootstrap`` section of the pipeline config); its
    :meth:`identity` names that run and is recorded in its checkpoints.
    """

    model_name: str | None = Field(
        None,
        description="open_clip model name (e.g. 'ViT-B-32'); None uses the bootstrap architecture.",
    )
    pretrained: str | None = Field(
        None,
        description="open_clip tag, 'hf-hub:org/name', or a local checkpoint path; None with a "
        "model_name: random weights, seeded so every process gets the same (tests, smoke runs).",
    )
    # Bootstrap-only: the architecture of the CLIP trained here when model_name is None.
    embed_dim: int = Field(64, ge=8, description=f"{_BOOT} Embedding dimension D.")
    image_size: int = Field(64, ge=8, description=f"{_BOOT} Input side in pixels.")
    vision_tower: Literal["vit", "resnet"] = Field(
        "vit",
        description=f"{_BOOT} vit: a vision transformer of `patch_size` patches, `vision_layers` "
        "blocks `vision_width` wide, pooled through its class token. resnet: open_clip's "
        "ModifiedResNet, four stages of `vision_layers` bottleneck blocks from a stem "
        "`vision_width` wide (the last stage 32 × as wide), pooled by attention over its last "
        "feature map (`image_size` / 32 on a side); it tells relative positions apart where the "
        "ViT does not (docs/compositional.md). Changes the CLIP's run name only when set.",
        json_schema_extra=IDENTITY_UNLESS_DEFAULT,  # runs from before the option keep their names
    )
    patch_size: int = Field(8, ge=1, description=f"{_BOOT} ViT patch side.")
    vision_width: int = Field(
        128, ge=8, description=f"{_BOOT} Vision transformer width (resnet: stem width)."
    )
    vision_layers: int = Field(
        3, ge=1, description=f"{_BOOT} Vision transformer layers (resnet: blocks per stage)."
    )
    text_width: int = Field(128, ge=8, description=f"{_BOOT} Text transformer width.")
    text_layers: int = Field(3, ge=1, description=f"{_BOOT} Text transformer layers.")
    heads: int = Field(4, ge=1, description=f"{_BOOT} Attention heads of both towers.")
    context_length: int = Field(16, ge=4, description=f"{_BOOT} Caption tokens.")

    @model_validator(mode="after")
    def _bootstrap_keys_only_for_the_bootstrap(self) -> ClipConfig:
        given = sorted(BOOTSTRAP_ONLY_KEYS & self.model_fields_set)
        if self.model_name is not None and given:
            raise ValueError(
                f"clip.{given[0]}: a bootstrap-only key (the architecture of the CLIP trained "
                f"here), but clip.model_name is {self.model_name!r}, whose architecture is "
                f"open_clip's; remove {', '.join('clip.' + k for k in given)}"
            )
        return self


BOOTSTRAP_ONLY_KEYS = frozenset(
    ["embed_dim", "image_size", "vision_tower", "patch_size", "vision_width", "vision_layers"]
    + ["text_width", "text_layers", "heads", "context_length"]
)


class EmbedConfig(ConfigSection):
    """The embedding stage: CLIP over every image shard, into Parquet (Ray Data decode tasks, encoders)."""

    batch_size: int = Field(
        256, ge=1, description="Samples per encoder call (and per decoded chunk)."
    )
    device: Literal["cpu", "cuda"] = "cpu"
    pipeline: Literal["auto", "split", "fused"] = Field(
        "auto",
        description="split: decode tasks feed a pool of `num_actors` encoders (GPU: actors). "
        "fused (CPU only): each task decodes one shard and encodes it with its worker's cached "
        "CLIP, so no pixels cross the object store and every CPU both decodes and encodes. "
        "auto: fused on CPU, split on GPU.",
    )
    num_actors: int = Field(
        1,
        ge=1,
        description="Encoders in the split pipeline's pool (1 CPU or 1 GPU each); leave CPUs for "
        "the decode tasks, or the pipeline waits for them.",
    )
    decode_cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs per decode task (read tar, decode, preprocess, tokenize; fused: and "
        "encode).",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Torch intra-op threads per encoder (None: its CPUs — 1 per split encoder, "
        "`decode_cpus` rounded per fused task).",
    )
    dedup_captions: bool = Field(
        True,
        description="Tokenize and encode each distinct caption of a batch once and give every "
        "sample with that caption its embedding (web data repeats captions); False encodes "
        "every caption.",
    )

    @model_validator(mode="after")
    def _fused_is_cpu_only(self) -> EmbedConfig:
        if self.pipeline == "fused" and self.device != "cpu":
            raise ValueError(
                "embed.pipeline 'fused' runs on CPU only; use 'split' (or 'auto') on GPU"
            )
        return self

    @property
    def fused(self) -> bool:
        """Whether decode and encode run in the same tasks."""
        return self.pipeline == "fused" or (self.pipeline == "auto" and self.device == "cpu")
