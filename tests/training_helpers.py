"""Test helpers for unclip.training: tiny tasks for the trainer and a storage root with embedded shapes.

``build_embedded_store`` writes, without Ray or a CLIP, exactly what the data stages leave
behind: a webdataset tar of synthetic shapes, its embedding Parquet (fake but structured
embeddings: one direction per caption, image = that direction plus noise), and the manifest with
its statistics (assembled by ``unclip.datasets.manifest``).

A module of its own (not conftest.py) so tests import it by a unique name; Ray workers receive
its classes by value.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.cloudpickle
import torch
from tiny import TINY_CLIP, tiny_trainer

from unclip.datasets.clip import build_bootstrap_clip, encode_texts, load_clip, save_clip
from unclip.datasets.clip_records import clip_record_path
from unclip.datasets.config import SyntheticConfig
from unclip.datasets.embedding_file import file_metadata, vector_array, write_embedding_table
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.shards import write_shard_unit
from unclip.datasets.storage import StorageLayout, atomic_write, write_json
from unclip.datasets.stream import RankStream, ShardSource, StreamPlan, StreamShard, StreamStats
from unclip.datasets.synthetic import render_image, sample_spec
from unclip.training.config import DecoderConfig, PriorConfig
from unclip.training.engine.fit_result import FitResult
from unclip.training.engine.runlog import read_rows
from unclip.training.engine.trainer import TrainTask, fit
from unclip.training.models.decoder import DecoderTask
from unclip.training.models.prior import PriorTask

# Ray workers cannot import this test module by name: ship its classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

DIM = 16
SOURCE = "src0000000000000"
CLIP_ID = "fakeclip00000000"
NUM_PAIRS = 120
HOLDOUT = 0.2


# --- a tiny task for the trainer ----------------------------------------------------------------
def regression_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The regression data set: x [n, 8] and y = x · w* [n, 1], fixed by a seed."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.linspace(-1, 1, 8).view(8, 1)


@dataclass
class RowSource(ShardSource):
    """``n`` rows of :func:`regression_rows` cut into shards of ``shard_size`` (the last shorter)."""

    n: int
    shard_size: int
    shards: list[StreamShard] = field(default_factory=list)

    def __post_init__(self) -> None:
        sizes = [min(self.shard_size, self.n - i) for i in range(0, self.n, self.shard_size)]
        self.shards = [StreamShard(f"rows/{i:05d}", c) for i, c in enumerate(sizes)]

    def read(self, shard: int, start: int, stop: int, stats: StreamStats) -> list[Any]:
        base = shard * self.shard_size
        stats.bytes_read += (stop - start) * 36
        return list(range(base + start, base + stop))

    def collate(self, samples: list[Any]) -> dict[str, Any]:
        return {"row": np.asarray(samples, dtype=np.int64)}


@dataclass
class Regression(TrainTask):
    """y = x · w* with a small MLP: its loss falls within a few steps."""

    n: int = 96  # 2 workers x 8: 6 steps an epoch
    export_name: str = "weights.pt"
    shard_size: int = 20

    def describe(self) -> dict[str, Any]:
        return {"model": "regression", "n": self.n}

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def data(self) -> RowSource:
        return RowSource(self.n, self.shard_size)

    def batch(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        x, y = regression_rows(self.n)
        idx = torch.from_numpy(columns["row"])
        return {"x": x[idx], "y": y[idx]}

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch["x"])
        # Noise drawn inside the loss: exact resume must replay it too.
        noise = 1e-3 * torch.randn_like(out)
        loss = torch.nn.functional.mse_loss(out + noise, batch["y"])
        return loss, {"abs_err": float((out - batch["y"]).abs().mean())}

    def export(self, model: torch.nn.Module, directory: str) -> None:
        torch.save(model.state_dict(), os.path.join(directory, self.export_name))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        x, y = regression_rows(self.n)
        return {"eval_mse": float(torch.nn.functional.mse_loss(model(x), y))}


@dataclass
class KilledOnce(Regression):
    """Rank 1's process dies (os._exit) at micro-batch ``die_at`` of its first life."""

    die_at: int = 9
    marker: str = ""
    log_dir: str = ""  # each process logs the rows of every batch: log_dir/rank{r}-{pid}.txt

    def describe(self) -> dict[str, Any]:
        return Regression.describe(self)  # the same model as Regression: same identity

    def batch(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        import time

        import ray.train

        self.calls = getattr(self, "calls", 0) + 1
        rank = ray.train.get_context().get_world_rank()
        if rank == 1 and self.calls == self.die_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        if self.log_dir:
            path = os.path.join(self.log_dir, f"rank{rank}-{os.getpid()}.txt")
            with open(path, "a") as f:
                if self.calls == 1:
                    f.write(f"{time.time()}\n")
                f.write(" ".join(str(int(r)) for r in columns["row"]) + "\n")
        return super().batch(columns)


@dataclass
class NanAt(Regression):
    """The loss of rank 0 becomes NaN from optimizer step ``nan_step`` on."""

    nan_step: int = 8

    def loss(
        self, model: Any, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        import ray.train

        self.calls = getattr(self, "calls", 0) + 1
        loss, metrics = super().loss(model, batch)
        if ray.train.get_context().get_world_rank() == 0 and self.calls >= self.nan_step:
            loss = loss * float("nan")
        return loss, metrics


# --- a storage root with embedded shapes ----------------------------------------------------
@dataclass
class EmbeddedStore:
    layout: StorageLayout
    manifest: dict[str, Any]
    version: str
    captions: list[str]


def _write_shard(layout: StorageLayout, shard: int, items: list[tuple[str, bytes, str]]) -> None:
    """Shard ``shard`` of ``SOURCE`` committed as ingest commits it (tar, Parquet, stats)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, png, caption in items:
            for name, data in (
                (f"{key}.png", png),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"key": key, "caption": caption}).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    # img2dataset's per-shard Parquet beside the tar: one row per sample, its status
    rows = pa.table(
        {
            "key": pa.array([k for k, _, _ in items], pa.string()),
            "caption": pa.array([c for _, _, c in items], pa.string()),
            "status": pa.array(["success"] * len(items), pa.string()),
        }
    )
    parquet = io.BytesIO()
    pq.write_table(rows, parquet)
    stats = {"count": len(items), "successes": len(items), "status_dict": {"success": len(items)}}
    write_shard_unit(layout, SOURCE, shard, buf.getvalue(), parquet.getvalue(), stats)


def add_empty_shard(store: EmbeddedStore, shard: int = 1) -> EmbeddedStore:
    """The store with one more shard of ``SOURCE`` holding no samples, and its new manifest."""
    layout = store.layout
    _write_shard(layout, shard, [])
    text = np.zeros((0, DIM), np.float32)
    table = pa.table(
        {
            "key": pa.array([], pa.string()),
            "caption": pa.array([], pa.string()),
            "url": pa.array([], pa.string()),
            "image_embedding": vector_array(text),
            "text_embedding": vector_array(text),
            "clip_score": pa.array([], pa.float32()),
        }
    ).replace_schema_metadata(file_metadata(CLIP_ID, DIM, {"fixture": True}, SOURCE, shard))
    with atomic_write(layout.embedding_shard(CLIP_ID, SOURCE, shard)) as f:
        write_embedding_table(table, f)
    manifest = assemble_manifest(layout, CLIP_ID, [SOURCE])
    return EmbeddedStore(layout, manifest, manifest["version"], store.captions)


def _synthetic_items(
    layout: StorageLayout, num_pairs: int
) -> tuple[list[tuple[str, bytes, str]], list[str]]:
    """``num_pairs`` synthetic shapes written as shard 0 of ``SOURCE``: (items, captions)."""
    syn = SyntheticConfig(num_pairs=num_pairs, image_size=64, seed=0)
    items, captions = [], []
    for i in range(num_pairs):
        im = render_image(syn, i)
        png = io.BytesIO()
        im.save(png, format="PNG")
        caption = sample_spec(syn, i)["caption"]
        items.append((f"{i:09d}", png.getvalue(), caption))
        captions.append(caption)
    _write_shard(layout, 0, items)
    return items, captions


def _image_near(text: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit image embeddings 0.8 · text + 0.6 · (unit noise), renormalized."""
    noise = rng.normal(size=text.shape)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    image = 0.8 * text + 0.6 * noise
    return image / np.linalg.norm(image, axis=1, keepdims=True)


def build_embedded_store(root: str, num_pairs: int = NUM_PAIRS) -> EmbeddedStore:
    layout = StorageLayout(root)
    items, captions = _synthetic_items(layout, num_pairs)

    classes = sorted(set(captions))
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(len(classes), DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    cls = np.array([classes.index(c) for c in captions])
    text = directions[cls]
    image = _image_near(text, rng)
    return _write_embeddings(layout, items, captions, text, image, CLIP_ID, {"fixture": True})


def _write_embeddings(
    layout: StorageLayout,
    items: list[tuple[str, bytes, str]],
    captions: list[str],
    text: np.ndarray,
    image: np.ndarray,
    clip_id: str,
    identity: dict[str, Any],
) -> EmbeddedStore:
    """The embedding Parquet of shard 0 (the embed stage's writer) and the manifest over it."""
    num_pairs, dim = text.shape
    table = pa.table(
        {
            "key": pa.array([k for k, _, _ in items], pa.string()),
            "caption": pa.array(captions, pa.string()),
            "url": pa.array([f"http://127.0.0.1/{i}.png" for i in range(num_pairs)], pa.string()),
            "image_embedding": vector_array(image),
            "text_embedding": vector_array(text),
            "clip_score": pa.array((image * text).sum(1).astype(np.float32), pa.float32()),
        }
    ).replace_schema_metadata(file_metadata(clip_id, dim, identity, SOURCE, 0))
    with atomic_write(layout.embedding_shard(clip_id, SOURCE, 0)) as f:
        write_embedding_table(table, f)  # the embed stage's own writer and file format
    manifest = assemble_manifest(layout, clip_id, [SOURCE])
    return EmbeddedStore(layout, manifest, manifest["version"], captions)


@dataclass
class ClipStore(EmbeddedStore):
    clip_dir: str  # the tiny CLIP's save_clip folder (under runs/clip/, as the bootstrap's)
    clip_id: str


def build_clip_store(root: str, num_pairs: int = NUM_PAIRS, seed: int = 0) -> ClipStore:
    """A storage root whose embeddings a real (untrained, tiny) open_clip CLIP made.

    Text embeddings are the CLIP's own of the captions; image embeddings lie near them. The
    CLIP is saved where the bootstrap's export lies and recorded in ``clip/{clip_id}/`` as the
    embed stage records it, so training can find it from the manifest's ``clip_id``.
    """
    layout = StorageLayout(root)
    torch.manual_seed(seed)
    clip_dir = save_clip(
        build_bootstrap_clip(TINY_CLIP), TINY_CLIP, layout.join("runs", "clip", "tiny", "export")
    )
    bundle = load_clip(TINY_CLIP, clip_dir)
    write_json(
        clip_record_path(layout, bundle.clip_id), {"clip_id": bundle.clip_id, **bundle.identity}
    )
    items, captions = _synthetic_items(layout, num_pairs)
    text = encode_texts(bundle, captions).astype(np.float64)
    image = _image_near(text, np.random.default_rng(seed))
    store = _write_embeddings(layout, items, captions, text, image, bundle.clip_id, bundle.identity)
    return ClipStore(
        store.layout, store.manifest, store.version, store.captions, clip_dir, bundle.clip_id
    )


# --- in-process prior and decoder tasks -------------------------------------------------------
TINY_PRIOR = PriorConfig(
    num_layers=1, num_attention_heads=2, attention_head_dim=16, timesteps=100, sample_steps=4
)
TINY_DECODER = DecoderConfig(
    image_size=16, block_out_channels=[16, 32], attention_head_dim=8, timesteps=100, sample_steps=3
)


def make_prior_task(dim: int = DIM, n: int = 32, clip_id: str = "clip0") -> PriorTask:
    """A prior task on no storage: its batches come from :func:`embedding_columns`."""
    task = PriorTask(
        layout=StorageLayout("/nonexistent"),
        manifest_version="v0",
        cfg=TINY_PRIOR,
        holdout_fraction=0.1,
        dim=dim,
        clip_id=clip_id,
        image_mean=[0.01] * dim,
        image_std=[0.2] * dim,
    )
    return task


def embedding_columns(n: int, dim: int = DIM, seed: int = 0) -> dict[str, Any]:
    """Columns of ``n`` random embedding pairs, as an embedding stream yields them."""
    rng = np.random.default_rng(seed)
    return {
        "key": [f"k{i}" for i in range(n)],
        "caption": [f"caption {i % 5}" for i in range(n)],
        "image_embedding": rng.normal(size=(n, dim)).astype(np.float32),
        "text_embedding": rng.normal(size=(n, dim)).astype(np.float32),
    }


def first_columns(task: TrainTask, n: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The first micro-batch of ``n`` that rank ``rank`` of ``world`` streams for ``task``."""
    source = task.data()
    plan = StreamPlan.make(source.shards, rank, world, n, 4096, seed=0)
    return next(RankStream(source, plan).batches(0))


def make_decoder_task(
    dim: int = DIM,
    layout: StorageLayout | None = None,
    version: str = "v0",
    clip_id: str = "clip0",
) -> DecoderTask:
    """A decoder task; it reads data only if given a layout and version."""
    return DecoderTask(
        layout=layout or StorageLayout("/nonexistent"),
        manifest_version=version,
        cfg=TINY_DECODER,
        holdout_fraction=HOLDOUT,
        dim=dim,
        clip_id=clip_id,
    )


def write_random_fid_inception(path: str, seed: int = 0) -> str:
    """Save a randomly initialised FID Inception's state dict at ``path``; return its sha256.

    The keys and shapes are those of the real FID weights (torch-fidelity's network), so the
    loading code runs unchanged without a download. Convolutions get He initialisation so the
    2048-d features keep a usable scale through the 90-odd layers.
    """
    import hashlib

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args: Any, **kwargs: Any) -> None:
            return None  # keep the random initialisation

    empty = f"{path}.empty"
    torch.save({}, empty)
    torch.manual_seed(seed)
    net = _Unloaded("inception-v3-compat", ["2048"], empty)
    os.unlink(empty)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@dataclass(kw_only=True)
class DecoderDiesOnce(DecoderTask):
    """A decoder task whose worker dies (os._exit) at micro-batch ``die_at`` of its first life."""

    marker: str
    die_at: int

    def batch(self, columns: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.die_at and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().batch(columns)


def fit_decoder_killed_once(
    store: EmbeddedStore, cfg: DecoderConfig, folder: str, run_name: str
) -> tuple[FitResult, list[float]]:
    """Train ``cfg`` (v-prediction) 40 steps on one ZeRO-1 worker that dies once at step 25;
    check that it resumed from its step-20 checkpoint, not from scratch. → (fit, logged losses)."""
    trainer = tiny_trainer(
        num_workers=1, zero_stage=1, max_steps=40, checkpoint_every=10, log_every=2, lr=5e-3
    )
    trainer = trainer.model_copy(update={"max_failures": 1, "batch_size": 16})
    cfg = cfg.model_copy(update={"trainer": trainer, "prediction_type": "v_prediction"})
    task = DecoderTask.from_manifest(store.layout, store.version, cfg, HOLDOUT)
    marker = os.path.join(folder, "died")
    same = {f.name: getattr(task, f.name) for f in fields(task) if f.init}
    dying = DecoderDiesOnce(**same, marker=marker, die_at=25)
    result = fit(dying, trainer, store.layout, "decoder", run_name)
    assert os.path.exists(marker)  # it died once, after the checkpoint at step 20
    rows = read_rows(os.path.join(result.run_dir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(2, 41, 2))  # resumed, not restarted
    return result, [r["loss"] for r in rows]


def export_untrained_cascade(root: str) -> tuple[str, str, str]:
    """(CLIP, prior, decoder) folders: a seeded, untrained tiny cascade exported as training does."""
    torch.manual_seed(0)
    clip_dir = save_clip(build_bootstrap_clip(TINY_CLIP), TINY_CLIP, f"{root}/clip")
    bundle = load_clip(TINY_CLIP, clip_dir)
    prior = make_prior_task(dim=TINY_CLIP.embed_dim, clip_id=bundle.clip_id)
    prior.export(prior.build_model(), f"{root}/prior")
    decoder = make_decoder_task(dim=TINY_CLIP.embed_dim, clip_id=bundle.clip_id)
    decoder.export(decoder.build_model(), f"{root}/decoder")
    return clip_dir, f"{root}/prior", f"{root}/decoder"
