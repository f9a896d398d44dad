"""Embed on Ray Data: the dataset of decode and encode tasks over a source's pending shards,
fused (CPU: one task per shard decodes and encodes) or split (decode tasks, then encoders)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import ray

from .clip import ClipBundle, load_clip
from .config import ClipConfig, EmbedConfig
from .embed_decode import DecodeSpec, decode_shard
from .embed_encode import cached_clip, encode_batch, encode_shard
from .embedding_writer import FileInfo
from .storage import StorageLayout


def _decode_udf(
    batch: dict[str, np.ndarray], root: str, source: str, spec: DecodeSpec
) -> Iterator[dict[str, np.ndarray]]:
    """The split pipeline's decode task: column batches of each shard in ``batch``."""
    layout = StorageLayout(root)
    for shard in batch["shard"]:
        yield from decode_shard(layout, source, int(shard), spec)


def _fused_udf(
    batch: dict[str, np.ndarray],
    root: str,
    source: str,
    clip_cfg: ClipConfig,
    checkpoint: str | None,
    cfg: EmbedConfig,
    clip_id: str,
) -> Iterator[dict[str, np.ndarray]]:
    """The fused pipeline's task: decode and encode whole shards with this worker's CLIP."""
    import torch

    torch.set_num_threads(cfg.torch_threads or max(1, round(cfg.decode_cpus)))
    bundle = cached_clip(clip_cfg, checkpoint, "cpu", clip_id)
    layout = StorageLayout(root)
    spec = DecodeSpec.of(bundle, cfg.batch_size, cfg.dedup_captions)
    for shard in batch["shard"]:
        yield encode_shard(layout, bundle, source, int(shard), spec)


def _encode_udf(
    batch: dict[str, np.ndarray],
    clip_cfg: ClipConfig,
    checkpoint: str | None,
    cfg: EmbedConfig,
    clip_id: str,
) -> dict[str, np.ndarray]:
    """The split pipeline's CPU encode task: a decoded batch through this worker's CLIP."""
    import torch

    torch.set_num_threads(cfg.torch_threads or 1)
    bundle = cached_clip(clip_cfg, checkpoint, cfg.device, clip_id)
    return encode_batch(bundle, batch, cfg.dedup_captions)


class ClipEncoder:
    """Ray Data actor (GPU encoders): loads the CLIP once, encodes batches of decoded samples."""

    def __init__(self, clip_cfg: ClipConfig, checkpoint: str | None, cfg: EmbedConfig) -> None:
        import torch

        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        self.bundle = load_clip(clip_cfg, checkpoint, device=cfg.device)
        self.dedup_captions = cfg.dedup_captions

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Embeddings of a decoded batch (its end rows pass through with zeros)."""
        return encode_batch(self.bundle, batch, self.dedup_captions)


def _pixel_bytes(info: FileInfo) -> int:
    """float32 bytes of one preprocessed image."""
    size = info.identity.get("preprocess_cfg", {}).get("size", 224)
    h, w = (size, size) if isinstance(size, int) else size
    return 3 * int(h) * int(w) * 4


def embedding_dataset(
    layout: StorageLayout,
    source_id: str,
    pending: list[int],
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    cfg: EmbedConfig,
    bundle: ClipBundle,
) -> ray.data.Dataset:
    """The Ray Data pipeline that decodes and encodes the ``pending`` shards: rows with
    embeddings and one end row per shard, for :class:`.embedding_writer.ShardGather`.

    ``cfg.fused`` picks one operator of decode-and-encode tasks; otherwise decode tasks feed a
    pool of encoders (GPU actors, or CPU tasks in reused workers).
    """
    clip_id, info = bundle.clip_id, FileInfo.of(bundle)
    shards = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
    # What a task holds beside its worker (torch and open_clip imported, ~650 MiB resident on
    # CPU): two chunks of pixels.
    task_memory = 2 * cfg.batch_size * _pixel_bytes(info) + 2**30
    per_shard_task = {"batch_size": 1, "num_cpus": cfg.decode_cpus, "memory": task_memory}
    shard_args = {"root": layout.root, "source": source_id}
    if cfg.fused:
        # One operator: a task per shard (decode_cpus each, as many at a time as Ray has CPUs
        # for), each decoding its shard and encoding it with the worker's cached CLIP.
        ds = shards.map_batches(
            _fused_udf,
            fn_kwargs={
                **shard_args,
                "clip_cfg": clip_cfg,
                "checkpoint": clip_checkpoint,
                "cfg": cfg,
                "clip_id": clip_id,
            },
            **per_shard_task,
        )
        # Ray Data's per-operator reservations exist to keep one operator from starving the
        # next; with a single operator they only hold CPUs back (on 2 CPUs: one task at a time
        # at first, and a scheduling round between a task's end and the next start). This
        # dataset's own context copy is changed, not the process-wide DataContext.
        ds.context.op_resource_reservation_enabled = False
    else:
        # Declaring memory (per_shard_task) also keeps decode in its own tasks: Ray Data fuses
        # a task map into the actor map after it when their remote args are equal, which would
        # decode inside the encoder.
        ds = shards.map_batches(
            _decode_udf,
            fn_kwargs={
                **shard_args,
                "spec": DecodeSpec.of(bundle, cfg.batch_size, cfg.dedup_captions),
            },
            **per_shard_task,
        )
        encoders = max(1, min(cfg.num_actors, len(pending)))
        if cfg.device == "cuda":  # a GPU keeps its model resident: one actor per GPU
            ds = ds.map_batches(
                ClipEncoder,
                fn_constructor_args=(clip_cfg, clip_checkpoint, cfg),
                batch_size=cfg.batch_size,
                compute=ray.data.ActorPoolStrategy(size=encoders),
                num_gpus=1,
            )
        else:  # CPU: tasks in Ray's reused workers, at most ``num_actors`` at a time
            ds = ds.map_batches(
                _encode_udf,
                fn_kwargs={
                    "clip_cfg": clip_cfg,
                    "checkpoint": clip_checkpoint,
                    "cfg": cfg,
                    "clip_id": clip_id,
                },
                batch_size=cfg.batch_size,
                concurrency=encoders,
                num_cpus=1,
            )
    return ds
