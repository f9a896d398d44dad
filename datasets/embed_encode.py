"""Embed's encode stage: CLIP image and text embeddings of decoded samples, the fused path's
decode-and-encode of a whole shard, and the one CLIP a worker process keeps between tasks."""

from __future__ import annotations

import warnings

import numpy as np

from .clip import ClipBundle, load_clip
from .config import ClipConfig
from .embed_decode import DecodeSpec, ShardTally, decode_chunks, end_row, sample_rows
from .storage import StorageLayout


def encode_arrays(
    bundle: ClipBundle, pixels: np.ndarray, tokens: np.ndarray, dedup_captions: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, D] image and text embeddings (L2-normalised) of N preprocessed samples.

    The pixels reach torch without a copy when they are C-contiguous float32 (decode's output
    is); with ``dedup_captions`` each distinct token row is encoded once and shared.
    """
    import torch

    x = np.ascontiguousarray(pixels, dtype=np.float32)
    distinct, inverse = tokens, None
    if dedup_captions and len(tokens) > 1:
        rows, where = np.unique(tokens, axis=0, return_inverse=True)
        if len(rows) < len(tokens):  # else keep the batch as it is (unique() sorts the rows)
            distinct, inverse = rows, where.reshape(-1)
    with torch.inference_mode(), warnings.catch_warnings():
        # a batch read from Ray's object store is read-only; the model only reads it
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        images = torch.from_numpy(x).to(bundle.device)
        ie = bundle.model.encode_image(images, normalize=True).float().cpu().numpy()
        t = torch.from_numpy(np.ascontiguousarray(distinct)).to(bundle.device)
        te = bundle.model.encode_text(t, normalize=True).float().cpu().numpy()
    if inverse is not None:
        te = te[inverse]
    return ie, te


def with_embeddings(
    rows: dict[str, np.ndarray], ie: np.ndarray, te: np.ndarray
) -> dict[str, np.ndarray]:
    """``rows`` with the float16 embeddings and their clip_score (from the float32 ones)."""
    rows["image_embedding"] = ie.astype(np.float16)
    rows["text_embedding"] = te.astype(np.float16)
    rows["clip_score"] = (ie * te).sum(axis=1).astype(np.float32)  # before rounding to float16
    return rows


def encode_batch(
    bundle: ClipBundle, batch: dict[str, np.ndarray], dedup_captions: bool = True
) -> dict[str, np.ndarray]:
    """Image and text embeddings (float16, L2-normalised) and clip_score of a decoded batch."""
    sample = ~batch["end"].astype(bool)
    n, d = len(sample), bundle.embed_dim
    ie = np.zeros((n, d), np.float32)
    te = np.zeros((n, d), np.float32)
    if sample.all():
        ie, te = encode_arrays(bundle, batch["pixels"], batch["tokens"], dedup_captions)
    elif sample.any():
        ie[sample], te[sample] = encode_arrays(
            bundle, batch["pixels"][sample], batch["tokens"][sample], dedup_captions
        )
    out = {k: v for k, v in batch.items() if k not in ("pixels", "tokens")}
    return with_embeddings(out, ie, te)


def encode_shard(
    layout: StorageLayout, bundle: ClipBundle, source: str, shard: int, spec: DecodeSpec
) -> dict[str, np.ndarray]:
    """Decode and encode one shard here (the fused pipeline's task): its encoded rows, then
    its end row, as one column batch — no pixels leave this function."""
    tally = ShardTally()
    parts = []
    for chunk in decode_chunks(layout, source, shard, spec, tally):
        ie, te = encode_arrays(bundle, chunk.pixels, chunk.tokens, spec.dedup_captions)
        parts.append(with_embeddings(sample_rows(shard, chunk), ie, te))
    d = bundle.embed_dim
    parts.append(
        with_embeddings(
            end_row(shard, tally), np.zeros((1, d), np.float32), np.zeros((1, d), np.float32)
        )
    )
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


# One CLIP per worker process, kept between encode tasks: Ray reuses its task workers, and the
# decode tasks have already imported torch and open_clip there (to unpickle the transform), so
# a CPU encoder needs neither a process of its own nor a second import of them.
_CACHED: dict[tuple[str, str | None, str, str], ClipBundle] = {}


def cached_clip(
    clip_cfg: ClipConfig, checkpoint: str | None, device: str, clip_id: str
) -> ClipBundle:
    """This process's CLIP for ``clip_id``, loaded on first use; a different id is an error."""
    key = (clip_cfg.model_dump_json(), checkpoint, device, clip_id)
    if key not in _CACHED:
        _CACHED.clear()  # one CLIP per process at a time
        bundle = load_clip(clip_cfg, checkpoint, device=device)
        if bundle.clip_id != clip_id:  # the checkpoint changed since the driver loaded it
            raise RuntimeError(
                f"CLIP {checkpoint}: loaded {bundle.clip_id}, the embed run started with {clip_id}"
            )
        _CACHED[key] = bundle
    return _CACHED[key]
