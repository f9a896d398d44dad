"""Check unclip's CUDA training path for real: bf16 + DeepSpeed ZeRO 0-3 over NCCL, one GPU.

Builds the prior and the decoder at GPU sizes, wraps each in ``deepspeed.initialize`` with the
trainer's own ``ds_config`` / ``param_groups`` and trains it on a fixed random batch with the
tasks' own ``batch`` / ``to_device`` / ``loss`` (the steps ``train_loop`` takes, without Ray
Train, checkpoints or the LR schedule). Asserts every loss is finite and that the loss falls
(overfit check: one fixed batch, the same noise and timesteps every step), and prints a table:
model, ZeRO stage, samples/s, peak GPU memory, first/last loss; the last line is one JSON object.

    DS_ACCELERATOR=cuda python benchmarks/cuda_check.py [--steps 30] [--stages 0,1,2,3]

Needs a CUDA GPU, deepspeed and diffusers (not run by the test suite).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Any, TypeVar

os.environ.setdefault("DS_ACCELERATOR", "cuda")  # before deepspeed is first imported
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29517")
os.environ.setdefault("RANK", "0")
os.environ.setdefault("LOCAL_RANK", "0")
os.environ.setdefault("WORLD_SIZE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unclip.datasets.storage import StorageLayout  # noqa: E402
from unclip.training.config import DecoderConfig, PriorConfig, TrainerConfig  # noqa: E402
from unclip.training.engine.optimization import ds_config, make_optimizer  # noqa: E402
from unclip.training.engine.train_loop import seed_micro_step, to_device  # noqa: E402
from unclip.training.models.decoder import DecoderTask  # noqa: E402
from unclip.training.models.prior import PriorTask  # noqa: E402

D = 768  # CLIP ViT-L/14 embedding width (Karlo's prior)
T = TypeVar("T")


def in_memory(cls: type[T], cfg: Any, **fields: Any) -> T:
    """A task of ``cls`` on no storage: its batches are built from in-memory columns."""
    return cls(
        layout=StorageLayout("/nonexistent"),
        manifest_version="cuda-check",
        cfg=cfg,
        holdout_fraction=0.0,
        dim=D,
        clip_id="random",
        **fields,
    )


def prior_task(batch: int) -> tuple[PriorTask, dict[str, np.ndarray]]:
    cfg = PriorConfig(num_layers=12, num_attention_heads=12, attention_head_dim=64)
    task = in_memory(PriorTask, cfg, image_mean=[0.0] * D, image_std=[0.03] * D)
    rng = np.random.default_rng(0)
    text = rng.normal(size=(batch, D)).astype(np.float32) / np.sqrt(D)
    image = rng.normal(size=(batch, D)).astype(np.float32) * 0.03
    return task, {"text_embedding": text, "image_embedding": image}


def decoder_task(batch: int) -> tuple[DecoderTask, dict[str, np.ndarray]]:
    cfg = DecoderConfig(
        image_size=64,
        block_out_channels=[128, 256, 384, 512],
        layers_per_block=2,
        attention_head_dim=64,
        attention_levels=2,
    )
    task = in_memory(DecoderTask, cfg)
    rng = np.random.default_rng(0)
    # smooth random images (an overfittable target): low-res noise upsampled by repetition
    low = rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8)
    images = np.ascontiguousarray(low.repeat(8, axis=1).repeat(8, axis=2))
    emb = rng.normal(size=(batch, D)).astype(np.float32) / np.sqrt(D)
    return task, {"image": images, "image_embedding": emb}


def run_stage(
    name: str, task: Any, columns: dict, stage: int, batch: int, steps: int, lr: float
) -> dict:
    import deepspeed

    cfg = TrainerConfig(
        use_gpu=True, precision="bf16", zero_stage=stage, batch_size=batch, lr=lr, num_workers=1
    )
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = make_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg))
    losses: list[float] = []
    timed_from = min(5, steps - 1)  # the first steps (allocator, cuDNN/cuBLAS autotune) untimed
    t0 = time.perf_counter()
    for step in range(steps):
        if step == timed_from:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        seed_micro_step(cfg.seed, 0, 0)  # the same t and noise every step: an overfit target
        b = to_device(task.batch(columns), device, torch.bfloat16)
        loss, _ = task.loss(engine, b)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        if not np.isfinite(losses[-1]):
            raise AssertionError(f"{name} ZeRO-{stage}: loss {losses[-1]} at step {step + 1}")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    row = {
        "model": name,
        "zero_stage": stage,
        "params_m": round(n_params / 1e6, 1),
        "batch": batch,
        "steps": steps,
        "samples_per_s": round((steps - timed_from) * batch / elapsed, 1),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "param_dtype": str(next(engine.module.parameters()).dtype),
    }
    if hasattr(engine, "destroy"):
        engine.destroy()
    del engine, optimizer, model
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--models", default="prior,decoder")
    ap.add_argument("--prior-batch", type=int, default=256)
    ap.add_argument("--decoder-batch", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import torch.distributed as dist

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    import deepspeed

    builders = {
        "prior": (prior_task, args.prior_batch, 3e-4),
        "decoder": (decoder_task, args.decoder_batch, 2e-4),
    }
    rows, failures = [], []
    for name in args.models.split(","):
        build, batch, lr = builders[name]
        task = build(batch)
        for stage in (int(s) for s in args.stages.split(",")):
            try:
                row = run_stage(name, *task, stage, batch, args.steps, lr)
            except Exception as e:  # report every stage, then fail
                failures.append(f"{name} ZeRO-{stage}: {type(e).__name__}: {e}")
                print(failures[-1], file=sys.stderr, flush=True)
                continue
            row["loss_falls"] = row["last_loss"] < 0.7 * row["first_loss"]
            if args.steps >= 10 and not row["loss_falls"]:  # a smoke run only checks finiteness
                failures.append(f"{name} ZeRO-{stage}: loss did not fall ({row})")
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    head = f"{'model':8} {'ZeRO':>4} {'params M':>8} {'batch':>5} {'samples/s':>10} "
    head += f"{'peak GiB':>8} {'first loss':>10} {'last loss':>10}"
    print(head)
    for r in rows:
        print(
            f"{r['model']:8} {r['zero_stage']:>4} {r['params_m']:>8} {r['batch']:>5} "
            f"{r['samples_per_s']:>10} {r['peak_mem_gib']:>8} {r['first_loss']:>10} "
            f"{r['last_loss']:>10}"
        )
    summary = {
        "ok": not failures,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "precision": "bf16",
        "backend": dist.get_backend(),
        "rows": rows,
        "failures": failures,
    }
    dist.destroy_process_group()
    print(json.dumps(summary))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
