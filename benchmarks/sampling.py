"""Sampling throughput: ``UnclipPipeline`` against the bare prior + decoder forward loop.

Builds the demo config's CLIP, prior and decoder (seeded, untrained: throughput does not depend
on the weights), exports them as training does, loads them once as an ``UnclipPipeline``, then
times, best of ``--repeat`` after one warm-up call:

1. **pipeline**: ``pipe(captions, ...)``: CLIP text encoding, the prior's DDIM loop with
   classifier-free guidance and k candidates, the decoder's DDIM loop, uint8 images;
2. **bare loop**: the same CLIP text encoding, then exactly the same model forwards with no
   scheduler, no guidance arithmetic, no conversions: ``steps`` prior forwards on the batch the
   pipeline's prior sees (2·k·N rows with guidance, k·N without) and ``steps`` decoder forwards
   on its batch (2·N or N), on the same tensors each time.

Prints a table and a final JSON line with ``ratio = bare seconds / pipeline seconds`` (images/s of
the pipeline relative to the bare loop; goal ≥ 0.95). ``--device cuda`` runs both on a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_pipeline(config: Path, root: str, device: str):
    """The config's CLIP, prior and decoder, untrained and seeded, as one pipeline on ``device``."""
    from unclip.datasets.clip import build_bootstrap_clip, load_clip, save_clip
    from unclip.datasets.storage import StorageLayout
    from unclip.pipelines.config import load_config
    from unclip.training.inference import UnclipPipeline
    from unclip.training.models.decoder import DecoderTask
    from unclip.training.models.prior import PriorTask

    cfg = load_config(config)
    torch.manual_seed(0)
    clip_dir = save_clip(build_bootstrap_clip(cfg.clip), cfg.clip, f"{root}/clip")
    bundle = load_clip(cfg.clip, clip_dir)
    dim = cfg.clip.embed_dim
    common = {
        "layout": StorageLayout(f"{root}/store"),
        "manifest_version": "v0",
        "holdout_fraction": 0.1,
        "dim": dim,
        "clip_id": bundle.clip_id,
    }
    prior = PriorTask(cfg=cfg.prior, image_mean=[0.0] * dim, image_std=[0.2] * dim, **common)
    decoder = DecoderTask(cfg=cfg.decoder, **common)
    for name, task in (("prior", prior), ("decoder", decoder)):
        task.export(task.build_model(), f"{root}/{name}")
    pipe = UnclipPipeline.from_exports(f"{root}/decoder", bundle, f"{root}/prior")
    return pipe.to(device), cfg


@torch.no_grad()
def bare_loop(pipe, captions: list[str], steps: int) -> None:
    """CLIP text encoding, then the prior's and the decoder's forwards alone, batch for batch."""
    from unclip.datasets.clip import encode_texts
    from unclip.training.models.decoder import decoder_prediction
    from unclip.training.models.prior_model import predict_x0

    prior, decoder = pipe.prior_sampler(), pipe.decoder_sampler()
    text = torch.from_numpy(encode_texts(pipe.clip_bundle(), captions)).to(prior.device)
    k = int(prior.info.get("candidates", 1))
    prior_rows = len(captions) * k * (2 if float(prior.info.get("guidance_scale", 1.0)) != 1 else 1)
    cond = text.repeat(prior_rows // len(captions), 1).to(prior.dtype)
    x = torch.randn(prior_rows, prior.dim, device=prior.device, dtype=prior.dtype)
    t = torch.full((prior_rows,), 500, device=prior.device)
    for _ in range(steps):
        predict_x0(prior.model, x, t, cond)
    rows = len(captions) * (2 if float(decoder.info.get("guidance_scale", 1.0)) != 1 else 1)
    emb = torch.randn(rows, decoder.dim, device=decoder.device, dtype=decoder.dtype)
    if decoder.text_conditioning:
        emb = torch.cat([emb, emb], dim=1)
    size = decoder.image_size
    x = torch.randn(rows, 3, size, size, device=decoder.device, dtype=decoder.dtype)
    t = torch.full((rows,), 500, device=decoder.device)
    for _ in range(steps):
        decoder_prediction(decoder.model, x, t, emb, decoder.text_conditioning)


def best_of(repeat: int, fn) -> float:
    """The fastest of ``repeat`` timed calls of ``fn`` (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the comparison; print the table and the JSON line; return the figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    ap.add_argument("--n", type=int, default=16, help="captions (one image each)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps of both (default: config)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unclip-sampling-") as root:
        pipe, cfg = build_pipeline(args.config, root, args.device)
        steps = args.steps or cfg.decoder.sample_steps
        colors, shapes = cfg.synthetic.colors, cfg.synthetic.shapes
        captions = [f"a {colors[i % len(colors)]} {shapes[i % len(shapes)]}" for i in range(args.n)]

        def pipeline() -> None:
            pipe(
                captions,
                prior_num_inference_steps=steps,
                decoder_num_inference_steps=steps,
                output_type="np",
            )

        t_pipe = best_of(args.repeat, pipeline)
        t_bare = best_of(args.repeat, lambda: bare_loop(pipe, captions, steps))
    out = {
        "images": args.n,
        "steps": steps,
        "pipeline_s": round(t_pipe, 3),
        "bare_s": round(t_bare, 3),
        "pipeline_images_per_s": round(args.n / t_pipe, 2),
        "bare_images_per_s": round(args.n / t_bare, 2),
        "ratio": round(t_bare / t_pipe, 3),
    }
    print(f"| path | seconds | images/s |  ({args.n} images, {steps} steps, {args.device})")
    print("| --- | --- | --- |")
    print(f"| UnclipPipeline | {t_pipe:.3f} | {args.n / t_pipe:.2f} |")
    print(f"| bare prior + decoder forwards | {t_bare:.3f} | {args.n / t_bare:.2f} |")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
