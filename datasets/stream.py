"""Training data as a stream: each rank reads only its own shards, in memory flat in N, resumable.

The order of an epoch is a pure function of ``(seed, epoch, shard counts, world)``:

1. the shards with samples are shuffled by ``(seed, epoch)``;
2. their samples, concatenated in that order, are the epoch's ``N`` positions; rank ``r`` of
   ``W`` takes the contiguous slice ``[r*n, (r+1)*n)``, ``n = N // W``, so it reads about
   ``N / W`` samples, from the shards its slice covers (the shard at each end of a slice is
   shared with the neighbouring rank);
3. every rank takes ``steps_per_epoch = n // batch_size`` micro-batches an epoch, the same on
   every rank, and reads only the positions they use;
4. the used part of the slice is cut into blocks of ``block`` positions (a multiple of the
   micro-batch); each block is read, decoded and permuted by ``(seed, epoch, rank, block)``.
   This is a bounded shuffle (MosaicML Streaming's ``py1b`` is the same idea): memory is
   ``O(block)`` whatever ``N`` is, and shuffling reaches across shards through step 1.

A position whose sample cannot be read (a corrupt image, a member lost to a truncated tar) is
counted in :class:`StreamStats` and its slot filled by another sample of the same block, picked
by the block's seed: blocks keep their size, so every rank runs the same steps and a resume
position stays exact.

Micro-step ``k`` of a run maps to ``(epoch, block, offset)`` by arithmetic alone, so a resumed
stream starts at the block holding ``k``, re-reading at most one block. The order depends on
``W`` inside an epoch; a run may change its world size only at an epoch boundary
(:func:`check_world_change`).

How a shard is read is a :class:`ShardSource`'s business (tars, Parquet, on any fsspec
filesystem); this module owns only order, blocks, fill-in and background prefetch.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Columns = dict[str, Any]  # column name -> np.ndarray (rows first) or list


@dataclass(frozen=True)
class StreamShard:
    """One shard as the stream sees it: a name for messages and how many samples it serves."""

    name: str
    count: int


@dataclass
class StreamStats:
    """What a rank's stream read and what it had to fill in."""

    errors: list[str] = field(default_factory=list)  # the first 20 messages
    bytes_read: int = 0
    samples: int = 0
    replaced: int = 0
    shards_opened: int = 0

    def bad(self, message: str) -> None:
        """Count one unreadable sample (its slot is filled from its block)."""
        self.replaced += 1
        if len(self.errors) < 20:
            self.errors.append(message)

    def as_metrics(self) -> dict[str, float]:
        return {
            "stream_bytes_read": float(self.bytes_read),
            "stream_samples": float(self.samples),
            "stream_replaced": float(self.replaced),
            "stream_shards_opened": float(self.shards_opened),
        }


@dataclass(frozen=True)
class Missing:
    """A position whose sample could not be read, and why: its slot is filled from its block."""

    message: str


class ShardSource(ABC):
    """The format side of a stream: its shards, how to read a span of one, how to decode.

    A source is pickled to every worker; it holds paths and settings, never data. Reading
    is sequential: :meth:`read` is called for consecutive spans, often of the same shard, so
    a source may keep the shard it read last (one shard, never more).
    """

    shards: list[StreamShard]

    @abstractmethod
    def read(self, shard: int, start: int, stop: int, stats: StreamStats) -> list[Any]:
        """The raw samples at positions ``[start, stop)`` of ``shard``; :class:`Missing` where lost."""

    def decode(self, raw: Any) -> Any:
        """A raw sample made ready to collate (runs on a decode thread); None if undecodable."""
        return raw

    @abstractmethod
    def collate(self, samples: list[Any]) -> Columns:
        """Decoded samples as columns: arrays with rows first (or lists)."""

    def identity(self) -> dict[str, Any]:
        """What a checkpoint records of this source: a resume with other data is refused."""
        return {"shards": len(self.shards), "samples": sum(s.count for s in self.shards)}


# --- the order: pure functions of (seed, epoch, counts, world) ----------------------------------
def shard_order(counts: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Indices of the shards with samples, shuffled by ``(seed, epoch)``."""
    nonempty = np.flatnonzero(counts > 0)
    rng = np.random.default_rng([seed % 2**32, epoch, 0x5EED])
    return nonempty[rng.permutation(len(nonempty))]


def rank_spans(
    counts: np.ndarray, order: np.ndarray, lo: int, hi: int
) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` spans covering positions ``[lo, hi)`` of the epoch's sequence."""
    ends = np.cumsum(counts[order])
    starts = ends - counts[order]
    spans = []
    first = int(np.searchsorted(ends, lo, side="right"))
    for j in range(first, len(order)):
        if starts[j] >= hi:
            break
        a, b = max(lo, int(starts[j])), min(hi, int(ends[j]))
        if a < b:
            spans.append((int(order[j]), a - int(starts[j]), b - int(starts[j])))
    return spans


@dataclass(frozen=True)
class StreamPlan:
    """Sizes of one rank's stream: slice, steps per epoch, block; all from the shard counts."""

    counts: tuple[int, ...]
    rank: int
    world: int
    batch_size: int
    block: int  # positions per shuffle block: a multiple of batch_size
    seed: int

    @classmethod
    def make(
        cls,
        shards: list[StreamShard],
        rank: int,
        world: int,
        batch_size: int,
        block: int,
        seed: int,
    ) -> StreamPlan:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world}")
        total = sum(s.count for s in shards)
        if total < 1:
            raise ValueError("the stream's shards hold no samples: nothing to train on")
        if total // world < batch_size:
            raise ValueError(
                f"{total} samples cannot give each of {world} workers one micro-batch of "
                f"{batch_size}; lower trainer.batch_size or num_workers"
            )
        block = max(batch_size, block // batch_size * batch_size)
        return cls(tuple(s.count for s in shards), rank, world, batch_size, block, seed)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def slice_size(self) -> int:
        return self.num_samples // self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.slice_size // self.batch_size

    def locate(self, micro_step: int) -> tuple[int, int, int]:
        """``(epoch, block, offset in block)`` of a micro-step's first sample."""
        epoch, i = divmod(micro_step, self.steps_per_epoch)
        block, offset = divmod(i * self.batch_size, self.block)
        return epoch, block, offset

    def num_blocks(self) -> int:
        return -(-self.steps_per_epoch * self.batch_size // self.block)

    def block_spans(self, epoch: int, block: int) -> list[tuple[int, int, int]]:
        """The spans of ``block`` of this rank's slice in ``epoch``."""
        counts = np.asarray(self.counts, dtype=np.int64)
        used = self.steps_per_epoch * self.batch_size
        base = self.rank * self.slice_size
        lo = base + block * self.block
        hi = base + min(used, (block + 1) * self.block)
        return rank_spans(counts, shard_order(counts, self.seed, epoch), lo, hi)

    def block_rng(self, epoch: int, block: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**32, epoch, self.rank, block, 0xB10C])


def check_world_change(saved_world: int, world: int, micro_step_in_epoch: int) -> None:
    """A run may change its world size only where no epoch is half read."""
    if saved_world != world and micro_step_in_epoch != 0:
        raise ValueError(
            f"the checkpoint was written by {saved_world} workers in the middle of an epoch; "
            f"resuming it with {world} would repeat or skip samples. Resume with "
            f"trainer.num_workers={saved_world}, or from a checkpoint at an epoch boundary"
        )


# --- one rank's stream ------------------------------------------------------------------------
class RankStream:
    """Micro-batches of one rank, read and decoded ahead on background threads."""

    def __init__(
        self,
        source: ShardSource,
        plan: StreamPlan,
        prefetch: int = 4,
        decode_threads: int = 1,
    ) -> None:
        self.source, self.plan = source, plan
        self.prefetch, self.decode_threads = prefetch, max(1, decode_threads)
        self.stats = StreamStats()

    def read_block(self, epoch: int, block: int, pool: ThreadPoolExecutor | None) -> Columns:
        """Block ``block`` of ``epoch``: read, decoded, holes filled, permuted, as columns."""
        raw: list[Any] = []
        for shard, start, stop in self.plan.block_spans(epoch, block):
            got = self.source.read(shard, start, stop, self.stats)
            if len(got) != stop - start:
                name = self.source.shards[shard].name
                raise RuntimeError(f"{name}: read {len(got)} samples of {stop - start}")
            raw += got
        decoded = list(pool.map(self._decode, raw)) if pool is not None else map(self._decode, raw)
        samples: list[Any] = []
        for sample in decoded:
            if isinstance(sample, Missing):
                self.stats.bad(sample.message)
                sample = None
            samples.append(sample)
        good = [i for i, s in enumerate(samples) if s is not None]
        if not good:
            names = sorted(
                {self.source.shards[s].name for s, _, _ in self.plan.block_spans(epoch, block)}
            )
            raise ValueError(f"no readable sample in a block of {len(samples)} from {names}")
        rng = self.plan.block_rng(epoch, block)
        holes = [i for i, s in enumerate(samples) if s is None]
        for i, pick in zip(holes, rng.choice(good, size=len(holes)), strict=True):
            samples[i] = samples[pick]
        self.stats.samples += len(samples)
        perm = rng.permutation(len(samples))
        return self.source.collate([samples[i] for i in perm])

    def _decode(self, raw: Any) -> Any:
        if isinstance(raw, Missing):
            return raw
        try:
            return self.source.decode(raw)
        except Exception as e:  # a bad sample is data: its slot is filled, the run goes on
            return Missing(f"{type(e).__name__}: {e}")

    def _blocks_from(self, micro_step: int, pool: ThreadPoolExecutor | None) -> Iterator[Columns]:
        """Micro-batches from ``micro_step`` on, forever (the trainer stops at max_steps)."""
        plan, b = self.plan, self.plan.batch_size
        epoch, block, offset = plan.locate(micro_step)
        while True:
            while block < plan.num_blocks():
                cols = self.read_block(epoch, block, pool)
                rows = len(next(iter(cols.values())))
                for lo in range(offset, rows, b):
                    yield {k: v[lo : lo + b] for k, v in cols.items()}
                block, offset = block + 1, 0
            epoch, block = epoch + 1, 0

    def batches(self, micro_step: int) -> Iterator[Columns]:
        """Micro-batches from global micro-step ``micro_step`` on, prefetched on a thread
        (``prefetch`` batches ahead; 0 reads each batch in the caller's thread when asked)."""
        if self.prefetch < 1:
            pool = ThreadPoolExecutor(self.decode_threads) if self.decode_threads > 1 else None
            try:
                yield from self._blocks_from(micro_step, pool)
            finally:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            pool = ThreadPoolExecutor(self.decode_threads) if self.decode_threads > 1 else None
            try:
                for batch in self._blocks_from(micro_step, pool):
                    if not put(batch):
                        return
            except BaseException as e:  # handed to the consumer, raised there
                put(e)
            finally:
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
            put(done)

        thread = threading.Thread(target=produce, name="unclip-stream", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
