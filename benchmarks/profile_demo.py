"""Where the demo's training time goes on CPU: the bootstrap CLIP's and the decoder's steps.

The demo trains both with 2 Ray Train workers of one CPU (one torch thread) each
(``configs/demo.yaml``). This takes each model as the demo config builds it, with its task's own
``batch`` and ``loss`` on random in-memory data of the demo's shapes (throughput does not depend
on the pixels), and times one worker's step in this process on one torch thread:

1. **phases** (median of ``--steps`` steps after ``--warmup``): building the batch from columns,
   forward + loss, backward, AdamW step;
2. **operators**: torch.profiler over ``--profile-steps`` steps, self CPU time grouped into
   convolution, attention, matmul / linear, normalization, elementwise and the rest;
3. **gradient exchange**: an all-reduce of the model's gradient size over gloo between 2
   processes of one thread (what DeepSpeed does each step at ZeRO 0 / 1), median of 20;
4. **AdamW**: the trainer's fused AdamW against torch's default per-tensor loop, one step over
   the model's weights;
5. **channels-last** (decoder only): the same step with the UNet and input in channels-last
   memory format, interleaved with the default one.

Data loading is not timed here: the demo's own runs log it (``data_wait_frac`` in each run's
``metrics.jsonl``, under 1 % after the first window). Run it alone on the machine; the last
line is JSON. Usage: ``python benchmarks/profile_demo.py [--steps 10]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from unclip.datasets.config import ClipConfig  # noqa: E402
from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.datasets.synthetic import shape_caption  # noqa: E402
from unclip.training.config import DecoderConfig, TrainerConfig  # noqa: E402
from unclip.training.engine.optimization import make_optimizer  # noqa: E402
from unclip.training.models.bootstrap_clip import ClipTask  # noqa: E402
from unclip.training.models.decoder import DecoderTask  # noqa: E402

GROUPS = {
    "convolution": ("conv", "mkldnn_convolution"),
    "attention": ("attention", "softmax", "bmm", "baddbmm"),
    "matmul / linear": ("aten::mm", "aten::addmm", "aten::linear", "matmul"),
    "normalization": ("norm",),
    "optimizer": ("optimizer", "adam", "lerp", "addcdiv", "_foreach"),
}


def demo_sections() -> tuple[ClipConfig, DecoderConfig, int, int]:
    """The demo's CLIP and decoder sections, and each one's per-worker batch."""
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    clip = ClipConfig(**raw["clip"])
    decoder = DecoderConfig(**{k: v for k, v in raw["decoder"].items() if k != "trainer"})
    return (
        clip,
        decoder,
        raw["bootstrap"]["trainer"]["batch_size"],
        raw["decoder"]["trainer"]["batch_size"],
    )


def clip_step(cfg: ClipConfig, batch: int) -> tuple[torch.nn.Module, Callable[[], Any]]:
    """The bootstrap CLIP task's batch and contrastive loss on random images and shape captions."""
    task = ClipTask(StorageLayout(tempfile.gettempdir()), cfg, ["profile"], 0.05)
    rng = np.random.default_rng(0)
    captions = [shape_caption(c, s) for c in ("red", "green", "blue") for s in ("circle", "square")]

    def columns() -> dict[str, Any]:
        size = cfg.image_size
        return {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "caption": [captions[i % len(captions)] for i in range(batch)],
        }

    torch.manual_seed(0)
    return task.build_model().train(), lambda: (task, columns)


def decoder_step(cfg: DecoderConfig, batch: int, dim: int) -> tuple[torch.nn.Module, Any]:
    """The decoder task's batch and loss (the demo's objective) on random images and embeddings."""
    task = DecoderTask(
        layout=StorageLayout(tempfile.gettempdir()),
        manifest_version="profile",
        cfg=cfg,
        holdout_fraction=0.05,
        dim=dim,
        clip_id="synthetic",
    )
    rng = np.random.default_rng(0)

    def columns() -> dict[str, Any]:
        emb = rng.normal(size=(batch, dim)).astype(np.float32)
        size = cfg.image_size
        return {
            "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "image_embedding": emb / np.linalg.norm(emb, axis=1, keepdims=True),
        }

    torch.manual_seed(0)
    return task.build_model().train(), lambda: (task, columns)


def phases(model: torch.nn.Module, make: Any, steps: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each phase of a training step."""
    task, columns = make()
    opt = make_optimizer(model, TrainerConfig())  # the trainer's: fused AdamW
    times: dict[str, list[float]] = {"batch": [], "forward + loss": [], "backward": [], "AdamW": []}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        b = task.batch(columns())
        t1 = time.perf_counter()
        loss = task.loss(model, b)[0]
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if i >= warmup:
            for k, a, z in zip(times, (t0, t1, t2, t3), (t1, t2, t3, t4), strict=True):
                times[k].append(1000 * (z - a))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["step"] = sum(out.values())
    return out


def operator_groups(model: torch.nn.Module, make: Any, steps: int) -> dict[str, float]:
    """Share of self CPU time per operator group over ``steps`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    task, columns = make()
    opt = make_optimizer(model, TrainerConfig())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            task.loss(model, task.batch(columns()))[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    totals = dict.fromkeys([*GROUPS, "elementwise and other"], 0.0)
    for e in prof.key_averages():
        name = e.key.lower()
        group = next(
            (g for g, keys in GROUPS.items() if any(k.lower() in name for k in keys)),
            "elementwise and other",
        )
        totals[group] += e.self_cpu_time_total
    whole = sum(totals.values()) or 1.0
    return {g: v / whole for g, v in totals.items()}


def adamw_ab(model: torch.nn.Module, steps: int) -> dict[str, float]:
    """Median milliseconds of one AdamW step over the model's weights: fused (the trainer's)
    against the per-tensor loop (torch's default), interleaved."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {
        "fused": torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True),
        "per-tensor loop": torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True),
    }
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(steps + 1):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[k].append(1000 * (time.perf_counter() - t0))
    model.zero_grad(set_to_none=True)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def _allreduce_worker(rank: int, numel: int, port: int, out: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    grad = torch.randn(numel)
    for _ in range(3):
        dist.all_reduce(grad)
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        times.append(1000 * (time.perf_counter() - t0))
    if rank == 0:
        out.put(statistics.median(times))
    dist.destroy_process_group()


def allreduce_ms(numel: int) -> float:
    """Median milliseconds of one fp32 all-reduce of ``numel`` values over gloo, 2 processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_worker, args=(r, numel, port, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    value = out.get(timeout=300)
    for p in procs:
        p.join()
    return float(value)


def channels_last_ab(model: torch.nn.Module, make: Any, steps: int) -> dict[str, float]:
    """Median step milliseconds with default and channels-last memory format, interleaved."""
    task, columns = make()
    opt = make_optimizer(model, TrainerConfig())
    times: dict[str, list[float]] = {"default": [], "channels_last": []}
    for _ in range(steps):
        for fmt in times:
            mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
            model.to(memory_format=mf)
            b = task.batch(columns())
            b["images"] = b["images"].contiguous(memory_format=mf)
            t0 = time.perf_counter()
            task.loss(model, b)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[fmt].append(1000 * (time.perf_counter() - t0))
    model.to(memory_format=torch.contiguous_format)
    return {k: statistics.median(v[1:]) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)  # a demo worker: one CPU, one torch thread
    clip_cfg, decoder_cfg, clip_batch, decoder_batch = demo_sections()
    models = {
        "bootstrap CLIP": clip_step(clip_cfg, clip_batch),
        "decoder": decoder_step(decoder_cfg, decoder_batch, clip_cfg.embed_dim),
    }
    batches = {"bootstrap CLIP": clip_batch, "decoder": decoder_batch}
    report: dict[str, Any] = {}
    for name, (model, make) in models.items():
        numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
        r: dict[str, Any] = {
            "batch_per_worker": batches[name],
            "params": numel,
            "phases_ms": phases(model, make, args.steps, args.warmup),
            "operators": operator_groups(model, make, args.profile_steps),
            "allreduce_ms": allreduce_ms(numel),
            "adamw_ms": adamw_ab(model, args.steps),
        }
        if name == "decoder":
            r["channels_last_ms"] = channels_last_ab(model, make, args.steps)
        report[name] = r

    for name, r in report.items():
        ph = r["phases_ms"]
        print(
            f"\n{name}: {r['params']:,} weights, batch {r['batch_per_worker']} per worker, 1 thread"
        )
        print("phase             ms/step   share")
        for k, v in ph.items():
            if k != "step":
                print(f"{k:<16} {v:8.1f}  {v / ph['step']:6.1%}")
        print(f"{'step':<16} {ph['step']:8.1f}")
        print(f"{'all-reduce (gloo, 2 processes)':<32} {r['allreduce_ms']:6.1f} ms")
        a = r["adamw_ms"]
        print(
            f"AdamW step: fused {a['fused']:.1f} ms, per-tensor loop {a['per-tensor loop']:.1f} ms"
        )
        print("operator group          share of self CPU time")
        for g, share in sorted(r["operators"].items(), key=lambda kv: -kv[1]):
            print(f"{g:<24}{share:8.1%}")
        if "channels_last_ms" in r:
            c = r["channels_last_ms"]
            print(
                f"channels-last: {c['channels_last']:.1f} ms/step vs {c['default']:.1f} default "
                f"({c['channels_last'] / c['default']:.2f}x)"
            )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
