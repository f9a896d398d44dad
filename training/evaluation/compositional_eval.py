"""GenEval-style compositional scores of a text-to-image model on the compositional shapes.

Six tasks, as GenEval (Ghosh et al. 2023): single object, two objects, counting, colours,
position, colour attribution. Each prompt (``unclip.datasets.compositional.evaluation_prompts``)
is drawn ``samples_per_prompt`` times (4, as GenEval); an exact pixel oracle
(``image_metrics.detect_objects``: colour segmentation and shape templates) judges every image,
so no detector's errors enter the score. A task's score is the fraction of its images judged
right; overall is the mean of the six task scores. Seen and held-out compositions are scored
apart. :func:`oracle_accuracy` measures the oracle itself on real rendered images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from unclip.datasets.compositional import TASKS, Prompt
from unclip.datasets.config import ClipConfig

from .image_metrics import RGB, DetectedObject, detect_objects

SPLITS = ("seen", "heldout")


def _find(objects: Sequence[DetectedObject], want: tuple[str, str]) -> DetectedObject | None:
    """The largest object of the wanted colour and shape, else of the wanted shape, else None."""
    exact = [o for o in objects if (o.color, o.shape) == want]
    shaped = [o for o in objects if o.shape == want[1]]
    return (exact or shaped or [None])[0]


def relation_holds(a: DetectedObject, relation: str, b: DetectedObject) -> bool:
    """Whether ``a`` is ``relation`` ``b``: along the axis where their centres differ most."""
    dx, dy = a.cx - b.cx, a.cy - b.cy  # y grows downwards
    if relation in ("left of", "right of"):
        return abs(dx) > abs(dy) and (dx < 0) == (relation == "left of")
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy < 0) == (relation == "above")
    raise ValueError(f"unknown relation {relation!r}")


def judge(prompt: Prompt, objects: Sequence[DetectedObject]) -> bool:
    """Whether the objects found in an image satisfy the prompt, by the rule of its task.

    single_object: an object of the shape · colors: an object of the shape, in the colour ·
    counting: exactly ``count`` objects of the shape · two_object: both shapes ·
    color_attr: both colour–shape pairs · position: both shapes (matched by colour where it
    can), the first in the relation to the second.
    """
    pairs = {(o.color, o.shape) for o in objects}
    shapes = {o.shape for o in objects}
    wanted = prompt.objects
    if prompt.task == "single_object":
        return wanted[0][1] in shapes
    if prompt.task == "colors":
        return wanted[0] in pairs
    if prompt.task == "counting":
        return sum(o.shape == wanted[0][1] for o in objects) == prompt.count
    if prompt.task == "two_object":
        return all(w[1] in shapes for w in wanted)
    if prompt.task == "color_attr":
        return all(w in pairs for w in wanted)
    if prompt.task == "position":
        a, b = _find(objects, wanted[0]), _find(objects, wanted[1])
        return (
            a is not None
            and b is not None
            and a is not b
            and relation_holds(a, prompt.relation or "", b)
        )
    raise ValueError(f"unknown compositional task {prompt.task!r}; tasks: {list(TASKS)}")


def judge_images(
    prompts: Sequence[Prompt], images: np.ndarray, palette: Mapping[str, RGB]
) -> list[bool]:
    """One judgement per image; ``images`` hold ``len(images) // len(prompts)`` per prompt,
    prompt-major."""
    if not prompts or len(images) % len(prompts):
        raise ValueError(
            f"{len(images)} images are not a whole number of samples for {len(prompts)} prompts"
        )
    per = len(images) // len(prompts)
    return [
        judge(prompts[i // per], detect_objects(image, palette)) for i, image in enumerate(images)
    ]


def task_scores(prompts: Sequence[Prompt], right: Sequence[bool]) -> dict[str, dict[str, Any]]:
    """Per split (seen, heldout): each task's fraction right, ``overall`` (the mean of the tasks
    scored) and the number of images per task."""
    if not prompts or len(right) % len(prompts):
        raise ValueError(f"{len(right)} judgements for {len(prompts)} prompts")
    per = len(right) // len(prompts)
    out: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        scores: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for task in TASKS:
            got = [
                r
                for i, r in enumerate(right)
                if prompts[i // per].task == task
                and prompts[i // per].heldout == (split == "heldout")
            ]
            if got:
                scores[task] = sum(got) / len(got)
                counts[task] = len(got)
        scores["overall"] = float(np.mean(list(scores.values()))) if scores else None
        scores["images"] = counts
        out[split] = scores
    return out


def oracle_accuracy(
    checks: Sequence[tuple[Prompt, bool]], images: Sequence[np.ndarray], palette: Mapping[str, RGB]
) -> dict[str, float]:
    """Per task, the fraction of (prompt, truth) checks on real images the oracle gets right;
    ``min`` is the worst task. ``images[i]`` is the image check ``i`` is about."""
    if len(checks) != len(images) or not checks:
        raise ValueError(f"{len(checks)} checks for {len(images)} images")
    right: dict[str, list[bool]] = {}
    for (prompt, truth), image in zip(checks, images, strict=True):
        verdict = judge(prompt, detect_objects(image, palette))
        right.setdefault(prompt.task, []).append(verdict == truth)
    acc = {task: sum(r) / len(r) for task, r in sorted(right.items())}
    return {**acc, "min": min(acc.values())}


def near_miss_accuracy(
    image_emb: np.ndarray,
    captions: Sequence[str],
    checks: Sequence[Sequence[tuple[Prompt, bool]]],
    encode_texts: Callable[[list[str]], np.ndarray],
) -> dict[str, float]:
    """CLIP's zero-shot view of composition: per task, the fraction of near misses (another
    colour, count or shape, swapped colours, the inverse relation) whose caption the image's
    embedding scores below the image's own caption. 0.5 is chance; the decoder can only draw
    what the embedding tells apart. ``checks[i]`` are image ``i``'s (prompt, truth) pairs."""
    if not (len(image_emb) == len(captions) == len(checks)) or not captions:
        raise ValueError(
            f"{len(image_emb)} embeddings, {len(captions)} captions and {len(checks)} check lists"
        )
    right: dict[str, list[bool]] = {}
    for emb, caption, image_checks in zip(image_emb, captions, checks, strict=True):
        misses = [p for p, truth in image_checks if not truth]
        if not misses:
            continue
        text = encode_texts([caption] + [p.caption for p in misses])
        sims = text @ emb
        for prompt, sim in zip(misses, sims[1:], strict=True):
            right.setdefault(prompt.task, []).append(bool(sims[0] > sim))
    return {task: sum(r) / len(r) for task, r in sorted(right.items())}


def picture_pick_accuracy(
    text_emb: np.ndarray, image_emb: np.ndarray, swapped_emb: np.ndarray
) -> float:
    """How often each caption's text embedding scores its own picture above the same objects with
    their places traded (the inverse relation's picture): what a prior trained on CLIP's pairs
    can follow from the words. 0.5 is chance. Row ``i`` of each array belongs together."""
    if not (len(text_emb) == len(image_emb) == len(swapped_emb)) or not len(text_emb):
        raise ValueError(
            f"{len(text_emb)} captions, {len(image_emb)} pictures and {len(swapped_emb)} swapped "
            "pictures"
        )
    own = (text_emb * image_emb).sum(axis=1)
    swapped = (text_emb * swapped_emb).sum(axis=1)
    return float(np.mean(own > swapped))


def true_check_scores(
    images: np.ndarray,
    checks: Sequence[Sequence[tuple[Prompt, bool]]],
    palette: Mapping[str, RGB],
) -> dict[str, float]:
    """Per task, the fraction of each image's true checks the oracle finds it satisfies:
    ``images[i]`` drawn for (or of) the caption that ``checks[i]`` are about."""
    if len(images) != len(checks) or not checks:
        raise ValueError(f"{len(images)} images for {len(checks)} check lists")
    right: dict[str, list[bool]] = {}
    for image, image_checks in zip(images, checks, strict=True):
        objects = detect_objects(image, palette)
        for prompt, truth in image_checks:
            if truth:
                right.setdefault(prompt.task, []).append(judge(prompt, objects))
    return {task: sum(r) / len(r) for task, r in sorted(right.items())}


def generate_prompt_images(
    captions: list[str],
    samples_per_prompt: int,
    seed: int,
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_export: str | None,
    decoder_export: str,
    steps: int | None,
    upsampler_exports: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """One worker's share: ``samples_per_prompt`` uint8 images per caption, caption-major, under
    ``final``; with an upsampler, the decoder's images it started from under ``decoder``."""
    from ..sampling import load_pipeline, sample_stages

    pipe = load_pipeline(decoder_export, clip_cfg, clip_checkpoint, prior_export, upsampler_exports)
    final, base = sample_stages(
        pipe,
        captions,
        seed,
        num_images_per_prompt=samples_per_prompt,
        decoder_num_inference_steps=steps,
    )
    return {"final": final} if base is None else {"final": final, "decoder": base}


def evaluate_compositional(
    prompts: Sequence[Prompt],
    palette: Mapping[str, RGB],
    clip_cfg: ClipConfig,
    clip_checkpoint: str | None,
    prior_export: str | None,
    decoder_export: str,
    samples_per_prompt: int = 4,
    steps: int | None = None,
    seed: int = 0,
    workers: int = 2,
    upsampler_exports: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Draw every prompt ``samples_per_prompt`` times in Ray tasks, judge, score per task and split.

    ``prior_export`` None: the decoder reads the captions' tokens itself (no prior). With an
    upsampler, the scores are the upsampled images', and ``before_upsampler`` holds the scores
    of the same samples at the decoder's resolution.
    """
    import ray

    captions = [p.caption for p in prompts]
    bounds = np.linspace(0, len(captions), min(workers, len(captions)) + 1).round().astype(int)
    task = ray.remote(num_cpus=1, max_retries=1)(generate_prompt_images)
    refs = [
        task.remote(
            captions[a:b],
            samples_per_prompt,
            seed + int(a),
            clip_cfg,
            clip_checkpoint,
            prior_export,
            decoder_export,
            steps,
            list(upsampler_exports),
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    chunks = ray.get(refs)
    out: dict[str, Any] = task_scores(
        prompts, judge_images(prompts, np.concatenate([c["final"] for c in chunks]), palette)
    )
    if upsampler_exports:
        decoded = np.concatenate([c["decoder"] for c in chunks])
        out["before_upsampler"] = task_scores(prompts, judge_images(prompts, decoded, palette))
    return out
