"""Finding the CLIP of a ``clip_id``: the embed stage's ``clip/{clip_id}/identity.json`` record, loaded back."""

from __future__ import annotations

import os
from typing import Any

from fsspec.core import url_to_fs

from .clip import CONFIG_NAME, ClipBundle, bootstrap_config_of, load_clip
from .config import ClipConfig
from .storage import StorageLayout, exists, read_json


def clip_record_path(layout: StorageLayout, clip_id: str) -> str:
    """``clip/{clip_id}/identity.json``: the embed stage's record of the CLIP and its source."""
    return f"{layout.clip_dir(clip_id)}/identity.json"


def clip_record(layout: StorageLayout, clip_id: str) -> dict[str, Any]:
    """The record the embed stage wrote for ``clip_id`` (architecture, weights hash, source)."""
    path = clip_record_path(layout, clip_id)
    if not exists(path):
        raise FileNotFoundError(
            f"no record of CLIP {clip_id} under the storage root ({path} is missing; the embed "
            "stage writes it): cannot tell which CLIP made these embeddings"
        )
    record = read_json(path)
    if not record.get("source"):
        raise ValueError(f"{path} does not say where CLIP {clip_id} came from (no 'source')")
    return record


def record_context_length(record: dict[str, Any]) -> int:
    """The text context length a record's model config gives (open_clip's default is 77)."""
    return int((record.get("model_cfg") or {}).get("text_cfg", {}).get("context_length", 77))


def _source_config(source: str, model_cfg: dict[str, Any]) -> tuple[ClipConfig, str | None]:
    """(config, checkpoint) that make ``load_clip`` load the CLIP a record's ``source`` names."""
    if source.startswith("hf-hub:"):
        return ClipConfig(pretrained=source.removesuffix(":None")), None
    fs, path = url_to_fs(source)
    if fs.exists(f"{path.rstrip('/')}/{CONFIG_NAME}"):  # a save_clip folder (the bootstrap's)
        return ClipConfig(), source
    if os.path.isdir(source):
        return ClipConfig(pretrained=source), None
    if os.path.isfile(source):  # a weights file in the bootstrap architecture
        return bootstrap_config_of(model_cfg, pretrained=source), None
    name, _, pretrained = source.partition(":")  # load_clip writes "{model_name}:{pretrained}"
    return ClipConfig(
        model_name=name, pretrained=None if pretrained in ("", "None") else pretrained
    ), None


def load_clip_from_record(record: dict[str, Any], device: str = "cpu") -> ClipBundle:
    """Load the CLIP a record names, checked to be the same CLIP (its ``clip_id``)."""
    source = str(record["source"])
    cfg, checkpoint = _source_config(source, record.get("model_cfg") or {})
    bundle = load_clip(cfg, checkpoint, device=device)
    if record.get("clip_id") and bundle.clip_id != record["clip_id"]:
        raise ValueError(
            f"the CLIP at {source} is now {bundle.clip_id}, not CLIP {record['clip_id']} "
            "the embeddings were made with"
        )
    return bundle


def load_clip_of(layout: StorageLayout, clip_id: str, device: str = "cpu") -> ClipBundle:
    """The CLIP that made the embeddings filed under ``clip_id`` on this storage root."""
    return load_clip_from_record({**clip_record(layout, clip_id), "clip_id": clip_id}, device)
