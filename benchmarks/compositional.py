"""Compositional quality of four text-to-image variants under equal compute, GenEval-style.

From ``configs/compositional.yaml`` (the compositional shapes with held-out compositions):

1. **unclip**: the pipeline's cascade, captions → CLIP text embedding → prior → decoder on the
   image embedding (the config's ``decoder`` section);
2. **unclip_text**: the same prior, and a decoder conditioned on the image embedding and the
   caption's text embedding (``decoder.text_conditioning``, the DALL·E 2 paper's default);
3. **text_tokens**: an Imagen-style decoder on the caption's CLIP token sequence by
   cross-attention (``decoder.condition: text_tokens``), no prior;
4. **caption_transformer**: a GLIDE-style decoder, the same but for its text side: a small text
   transformer trained with the UNet on the pixel loss (``decoder.condition:
   caption_transformer``), no prior and no CLIP.

The four decoders are trained by the one trainer on the same dataset version with the same
``decoder.trainer`` section (steps, batch, learning rate); the two unCLIP variants also use the
prior, which the other two do not need. Each is scored by the pixel oracle on the same prompts
(``evaluation_prompts``), 4 samples per prompt; one table shows held-out compositions (and
which variant wins each task), the next seen ones. With an ``upsampler`` section, every variant's
images go through it, and each table shows each variant at the upsampler's resolution and, for
the same samples, at the decoder's. ``oracle_accuracy_real`` is the oracle's worst per-task
accuracy on the held-out real images of the dataset at each of those resolutions (with near-miss
prompts).

A second table, ``where_composition_is_lost``, follows composition through the unCLIP stages on the
first ``--lost-samples`` held-out real samples (seen compositions, unseen images), at the decoder's
resolution: how often CLIP scores each sample's caption above its near misses, what the real images
meet, what each unCLIP decoder draws from the samples' own embeddings (no prior), and what the
cascade draws from their captions. Two more tables have the same stages for pictures no training
caption names: each held-out colour–shape pair rendered alone, and each held-out relation drawn as
a relation sample, with ``clip_picture_pick`` (does the caption's text embedding prefer its picture
to the inverse relation's?).

    python benchmarks/compositional.py                # full size: ~41 min on 2 CPUs
    python benchmarks/compositional.py --shrunk       # seconds-scale models: checks it runs
    python benchmarks/compositional.py --config my-variant.yaml   # another config, same table
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "compositional.yaml"
VARIANTS = ("unclip", "unclip_text", "text_tokens", "caption_transformer")
WITHOUT_PRIOR = ("text_tokens", "caption_transformer")  # they read the caption themselves

TINY_TRAINER = {"num_workers": 2, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 20}
SHRUNK = {
    "synthetic": {"num_pairs": 240},
    "ingest": {"samples_per_shard": 150, "thread_count": 8},
    "clip": {
        "embed_dim": 32,
        "vision_width": 64,
        "vision_layers": 1,
        "text_width": 64,
        "text_layers": 1,
        "heads": 2,
    },
    "bootstrap": {"trainer": {**TINY_TRAINER, "max_steps": 10}},
    "embed": {"batch_size": 64},
    "prior": {
        "num_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "sample_steps": 3,
        "trainer": {**TINY_TRAINER, "max_steps": 10},
    },
    "decoder": {
        "image_size": 32,  # the resolution the oracle is validated at
        "block_out_channels": [16, 32],
        "sample_steps": 2,
        "trainer": {**TINY_TRAINER, "max_steps": 8},
    },
    "upsampler": {
        "block_out_channels": [16, 32],
        "sample_steps": 2,
        "trainer": {**TINY_TRAINER, "max_steps": 6},
    },
    "evaluate": {
        "holdout_fraction": 0.1,
        "captions": ["a red circle"],
        "num_eval_samples": 4,
        "eval_steps": 2,  # the config's 25 DDIM steps took 3/4 of the shrunk scoring's time
    },
}


def write_config(shrunk: bool, storage: str | None, folder: str, config: Path = CONFIG) -> str:
    """The config to run: ``config`` (shrunk), its storage made absolute or overridden."""
    from unclip.pipelines.config import deep_merge

    raw = yaml.safe_load(config.read_text())
    if shrunk:
        raw = deep_merge(raw, SHRUNK)
    raw["storage"] = (
        os.path.abspath(storage) if storage else str((config.parent / raw["storage"]).resolve())
    )
    path = os.path.join(folder, "compositional.yaml")
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_all(config_path: str) -> dict[str, Any]:
    """The pipeline up to prior and decoder, then the two other decoders on its dataset version."""
    from unclip.datasets.storage import StorageLayout, read_json
    from unclip.pipelines.config import load_config
    from unclip.pipelines.runner import run_pipeline, upstream_of
    from unclip.training.models.decoder import train_decoder

    cfg = load_config(config_path)
    stages = ["prior", "decoder"] + (["upsampler"] if cfg.upsampler is not None else [])
    run = run_pipeline(config_path, cfg, select=upstream_of(stages))
    if not run.success:
        raise RuntimeError(f"the pipeline failed: {run}")
    layout = StorageLayout(cfg.storage)
    prior = read_json(layout.latest_run("prior"))
    decoder = read_json(layout.latest_run("decoder"))
    clip = read_json(layout.latest_run("clip"))
    version, holdout = decoder["dataset_version"], cfg.evaluate.holdout_fraction
    exports = {"unclip": decoder["export"]}
    for name, update in (
        ("unclip_text", {"text_conditioning": True}),
        ("text_tokens", {"condition": "text_tokens"}),
        ("caption_transformer", {"condition": "caption_transformer"}),
    ):
        fit = train_decoder(layout, version, cfg.decoder.model_copy(update=update), holdout)
        exports[name] = fit.export_dir
    upsampler = read_json(layout.latest_run("upsampler")) if cfg.upsampler is not None else None
    return {
        "cfg": cfg,
        "layout": layout,
        "version": version,
        "prior": prior["export"],
        "decoders": exports,
        "upsamplers": [upsampler["export"]] if upsampler else [],
        "clip_checkpoint": clip["export"],
    }


def holdout_samples(cfg: Any, layout: Any, version: str) -> tuple[Any, list[list[Any]]]:
    """The dataset's held-out real samples (``ImagePairs``) and each one's (prompt, truth) checks:
    the prompts it satisfies and their near misses."""
    from unclip.datasets import readers
    from unclip.datasets.compositional import sample_prompts
    from unclip.datasets.synthetic import sample_spec

    manifest = readers.load_manifest(layout, version)
    pairs = readers.load_image_pairs(layout, manifest, "holdout", cfg.evaluate.holdout_fraction)
    # What an image must show follows from its caption alone (kinds, objects and relations are
    # all in the grammar), so any generated sample of the same caption gives its checks.
    spec_of: dict[str, dict[str, Any]] = {}
    for i in range(cfg.synthetic.num_pairs):
        spec = sample_spec(cfg.synthetic, i)
        spec_of.setdefault(spec["caption"], spec)
    return pairs, [sample_prompts(spec_of[caption], cfg.synthetic) for caption in pairs.captions]


def first_samples(pairs: Any, checks: list[list[Any]], n: int) -> tuple[Any, list[list[Any]]]:
    """The first ``n`` held-out samples and their checks (all of them when ``n`` is 0)."""
    if n <= 0 or n >= len(pairs.captions):
        return pairs, checks
    cut = {
        "keys": pairs.keys[:n],
        "captions": pairs.captions[:n],
        "images": pairs.images[:n],
        "image_emb": None if pairs.image_emb is None else pairs.image_emb[:n],
        "text_emb": None if pairs.text_emb is None else pairs.text_emb[:n],
    }
    return dataclasses.replace(pairs, **cut), checks[:n]


def real_oracle_accuracy(
    cfg: Any, pairs: Any, checks: list[list[Any]], size: int
) -> dict[str, float]:
    """The oracle on the held-out real images (resized to ``size``) with their near misses."""
    from unclip.datasets.synthetic import color_palette
    from unclip.training.evaluation.cascade_eval import resize_all
    from unclip.training.evaluation.compositional_eval import oracle_accuracy

    images = resize_all(pairs.images, size)
    flat = [
        (check, image)
        for image, image_checks in zip(images, checks, strict=True)
        for check in image_checks
    ]
    return oracle_accuracy([c for c, _ in flat], [i for _, i in flat], color_palette(cfg.synthetic))


def variant_rows(
    scores: dict[str, Any], split: str, sizes: list[int]
) -> list[tuple[str, dict[str, float]]]:
    """Each variant's scores on ``split`` at the final size, then before the upsampler."""
    rows = []
    for name in VARIANTS:
        rows.append((f"{name} {sizes[-1]}px", scores[name][split]))
        if "before_upsampler" in scores[name]:
            rows.append((f"{name} {sizes[0]}px", scores[name]["before_upsampler"][split]))
    return rows


def where_composition_is_lost(
    cfg: Any, trained: dict[str, Any], pairs: Any, checks: list[list[Any]]
) -> dict[str, dict[str, float]]:
    """Which stage loses composition, on the held-out samples (seen compositions, unseen images)
    at the decoder's resolution, per task:

    - ``clip_near_miss``: CLIP scores the image's caption above each near miss (0.5 is chance);
    - ``real``: the real images, judged by the oracle (its ceiling);
    - ``<variant> reconstruction``: the unCLIP decoder from each sample's own image embedding
      (and caption embedding), so no prior: what the decoder can draw from a perfect embedding;
    - ``<variant> cascade``: prior then decoder from each sample's caption.

    ``heldout_pairs`` has the same rows for images no training sample shows: each held-out
    colour–shape pair, rendered alone (``heldout_pair_specs``). ``heldout_relations`` has them
    for pictures of the held-out relations, which no training caption names
    (``heldout_relation_specs``), and ``clip_picture_pick``: how often a caption's text embedding
    scores its picture above the inverse relation's picture (``picture_pick_accuracy``).
    """
    import numpy as np
    import torch
    from PIL import Image

    from unclip.datasets.clip import encode_images, encode_texts, load_clip
    from unclip.datasets.compositional import (
        Prompt,
        heldout_pair_specs,
        heldout_relation_specs,
        sample_prompts,
        swap_places,
    )
    from unclip.datasets.synthetic import color_palette, render_spec
    from unclip.training.evaluation.cascade_eval import resize_all
    from unclip.training.evaluation.compositional_eval import (
        near_miss_accuracy,
        picture_pick_accuracy,
        true_check_scores,
    )
    from unclip.training.inference import UnclipPipeline

    bicubic = Image.Resampling.BICUBIC
    palette = color_palette(cfg.synthetic)
    steps, seed = cfg.evaluate.eval_steps, cfg.evaluate.eval_seed
    size = cfg.decoder.image_size
    clip = load_clip(cfg.clip, trained["clip_checkpoint"])
    encode = functools.partial(encode_texts, clip)

    def rendered(specs: list[dict[str, Any]]) -> tuple[list[Any], np.ndarray]:
        """The specs drawn at CLIP's input size, and at the decoder's for the oracle."""
        images = [
            render_spec(cfg.synthetic, spec).resize((cfg.clip.image_size,) * 2, bicubic)
            for spec in specs
        ]
        return images, resize_all(np.stack([np.asarray(x) for x in images]), size)

    pair_specs = heldout_pair_specs(cfg.synthetic, per_pair=24)
    pair_images, pair_real = rendered(pair_specs)
    pair_checks = [
        [
            (Prompt(task, spec["caption"], ((spec["color"], spec["shape"]),), True), True)
            for task in ("single_object", "colors")
        ]
        for spec in pair_specs
    ]
    relation_specs = heldout_relation_specs(cfg.synthetic, per_relation=24)
    relation_images, relation_real = rendered(relation_specs)
    swapped_images, _ = rendered([swap_places(s, cfg.synthetic.image_size) for s in relation_specs])
    relation_checks = [sample_prompts(spec, cfg.synthetic) for spec in relation_specs]

    out: dict[str, dict[str, float]] = {
        "real": true_check_scores(resize_all(pairs.images, size), checks, palette),
        "clip_near_miss": near_miss_accuracy(pairs.image_emb, pairs.captions, checks, encode),
    }
    unseen: dict[str, dict[str, float]] = {
        "real": true_check_scores(pair_real, pair_checks, palette)
    }
    relation_emb = encode_images(clip, relation_images)
    relation_captions = [spec["caption"] for spec in relation_specs]
    relation_text = encode(relation_captions)
    unnamed: dict[str, dict[str, float]] = {
        "real": true_check_scores(relation_real, relation_checks, palette),
        "clip_near_miss": near_miss_accuracy(
            relation_emb, relation_captions, relation_checks, encode
        ),
        "clip_picture_pick": {
            "position": picture_pick_accuracy(
                relation_text, relation_emb, encode_images(clip, swapped_images)
            )
        },
    }
    pair_captions = [spec["caption"] for spec in pair_specs]
    samples = (
        (out, pairs.image_emb, pairs.text_emb, pairs.captions, checks),
        (
            unseen,
            encode_images(clip, pair_images),
            encode(pair_captions),
            pair_captions,
            pair_checks,
        ),
        (unnamed, relation_emb, relation_text, relation_captions, relation_checks),
    )
    for name in ("unclip", "unclip_text"):
        pipe = UnclipPipeline.from_exports(trained["decoders"][name], clip, trained["prior"])
        for table, image_emb, text_emb, captions, truths in samples:
            rebuilt = pipe.decoder_sampler().sample(
                torch.from_numpy(image_emb),
                steps=steps,
                seed=seed,
                text_emb=torch.from_numpy(text_emb),
            )
            table[f"{name} reconstruction"] = true_check_scores(rebuilt, truths, palette)
            drawn = pipe(
                list(captions),
                seed=seed,
                upsample=False,
                output_type="np",
                decoder_num_inference_steps=steps,
            ).images
            table[f"{name} cascade"] = true_check_scores(drawn, truths, palette)
    return {**out, "heldout_pairs": unseen, "heldout_relations": unnamed}


def print_table(
    head: str, rows: list[tuple[str, dict[str, float]]], columns: Sequence[str], width: int
) -> None:
    """One line per (label, scores) row, a score per column (nan where the row has none)."""
    print(f"{head:<{width}}" + "".join(f"{c:>14}" for c in columns))
    for label, row in rows:
        print(f"{label:<{width}}" + "".join(f"{row.get(c, float('nan')):>14.3f}" for c in columns))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shrunk", action="store_true", help="tiny models and data: checks it runs"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=CONFIG,
        help="a variant of configs/compositional.yaml to compare (default: that file); its "
        "relative storage is resolved against its own folder",
    )
    parser.add_argument("--storage", help="storage root (default: the config's)")
    parser.add_argument("--prompts-per-task", type=int, default=None)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument(
        "--lost-samples",
        type=int,
        default=300,
        help="held-out samples the 'where composition is lost' stages draw from (the first N; "
        "0: all of them)",
    )
    args = parser.parse_args(argv)
    if not args.config.is_file():
        parser.error(f"--config {args.config}: no such file")
    per_task = args.prompts_per_task or (1 if args.shrunk else 12)

    from unclip.datasets.compositional import TASKS, evaluation_prompts
    from unclip.datasets.synthetic import color_palette
    from unclip.training.evaluation.compositional_eval import evaluate_compositional

    with tempfile.TemporaryDirectory(prefix="unclip-compositional-") as folder:
        trained = train_all(write_config(args.shrunk, args.storage, folder, args.config))
    cfg = trained["cfg"]
    prompts = evaluation_prompts(cfg.synthetic, per_task, seed=cfg.evaluate.eval_seed)
    scores = {}
    for name in VARIANTS:
        scores[name] = evaluate_compositional(
            prompts,
            color_palette(cfg.synthetic),
            cfg.clip,
            trained["clip_checkpoint"],
            None if name in WITHOUT_PRIOR else trained["prior"],
            trained["decoders"][name],
            samples_per_prompt=args.samples_per_prompt,
            steps=cfg.evaluate.eval_steps,
            seed=cfg.evaluate.eval_seed,
            workers=cfg.evaluate.eval_workers,
            upsampler_exports=trained["upsamplers"],
        )
    sizes = [cfg.decoder.image_size] + ([cfg.upsampler.output_size] if cfg.upsampler else [])
    pairs, checks = holdout_samples(cfg, trained["layout"], trained["version"])
    at_size = {size: real_oracle_accuracy(cfg, pairs, checks, size) for size in sizes}
    oracle = min(at_size.values(), key=lambda acc: acc["min"])

    columns = [*TASKS, "overall"]
    print(
        f"held-out compositions, {args.samples_per_prompt} samples per prompt "
        f"(oracle on real images: worst task {oracle['min']:.3f})"
    )
    print_table("variant", variant_rows(scores, "heldout", sizes), columns, width=20)
    winners = {}  # the variant with the best score, or every variant tied at it
    for task in columns:
        best = max(scores[v]["heldout"].get(task, -1.0) for v in VARIANTS)
        tied = [v for v in VARIANTS if scores[v]["heldout"].get(task, -1.0) == best]
        winners[task] = tied[0] if len(tied) == 1 else "tie: " + " = ".join(tied)
    print("best per task (held out): " + ", ".join(f"{t}: {v}" for t, v in winners.items()))
    print(f"seen compositions, {args.samples_per_prompt} samples per prompt")
    print_table("variant", variant_rows(scores, "seen", sizes), columns, width=20)
    lost_pairs, lost_checks = first_samples(pairs, checks, args.lost_samples)
    lost = where_composition_is_lost(cfg, trained, lost_pairs, lost_checks)
    print(
        f"where composition is lost: {len(lost_pairs.captions)} held-out samples of seen "
        f"compositions, {sizes[0]}px, fraction of true checks met (clip_near_miss: of near misses "
        "told apart)"
    )
    rendered = ("heldout_pairs", "heldout_relations")
    stages = [(label, row) for label, row in lost.items() if label not in rendered]
    print_table("stage", stages, TASKS, width=28)
    print("held-out colour-shape pairs, each rendered alone: the same stages")
    print_table("stage", list(lost["heldout_pairs"].items()), TASKS, width=28)
    print(
        "held-out relations, rendered as relation samples (no training caption names them; "
        "clip_picture_pick: the caption's text embedding scores its picture above the inverse "
        "relation's)"
    )
    print_table("stage", list(lost["heldout_relations"].items()), TASKS, width=28)
    result = {
        "where_composition_is_lost": lost,
        "unclip_overall_heldout": scores["unclip"]["heldout"]["overall"],
        "best_color_attribution_heldout": max(s["heldout"]["color_attr"] for s in scores.values()),
        "best_position_heldout": max(s["heldout"]["position"] for s in scores.values()),
        "oracle_accuracy_real": oracle["min"],
        "oracle_accuracy_real_per_task": oracle,
        "oracle_accuracy_real_per_size": {str(k): v["min"] for k, v in at_size.items()},
        "image_size": sizes[-1],
        "winners_heldout": winners,
        "scores": scores,
        "prompts_per_task": per_task,
        "samples_per_prompt": args.samples_per_prompt,
        "lost_samples": len(lost_pairs.captions),
        "decoder_steps_each": cfg.decoder.trainer.max_steps,
        "shrunk": args.shrunk,
        "config": str(args.config.resolve()),
    }
    if cfg.upsampler is not None:
        before = scores["unclip"]["before_upsampler"]["heldout"]["overall"]
        result["unclip_overall_heldout_before_upsampler"] = before
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
