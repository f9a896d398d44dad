"""The compositional (GenEval-style) evaluation: the pixel oracle on real renders, task rules, scores."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from unclip.datasets.compositional import Prompt, evaluation_prompts, sample_prompts
from unclip.datasets.config import CompositionalConfig, SyntheticConfig
from unclip.datasets.synthetic import color_palette, render_image, sample_spec
from unclip.training.evaluation.compositional_eval import (
    judge,
    judge_images,
    near_miss_accuracy,
    oracle_accuracy,
    picture_pick_accuracy,
    task_scores,
    true_check_scores,
)
from unclip.training.evaluation.image_metrics import DetectedObject

CFG = SyntheticConfig(num_pairs=300, image_size=96, seed=11, compositional=CompositionalConfig())
PALETTE = color_palette(CFG)


def as_evaluated(index: int, size: int) -> np.ndarray:
    """A real rendered sample at ``size`` px, resized as ingest (64 px) and evaluation do."""
    image = render_image(CFG, index).resize((64, 64), Image.Resampling.BICUBIC)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size", [64, 32])
def test_the_oracle_is_right_on_real_renders_for_every_task(size):
    checks, images = [], []
    for i in range(CFG.num_pairs):
        image = as_evaluated(i, size)
        for check in sample_prompts(sample_spec(CFG, i), CFG):
            checks.append(check)
            images.append(image)
    assert {p.task for p, _ in checks} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert sum(truth for _, truth in checks) < len(checks)  # near misses are judged too
    acc = oracle_accuracy(checks, images, PALETTE)
    print(f"oracle accuracy at {size} px: {acc}")
    assert acc["min"] >= 0.99, acc


def obj(color: str, shape: str, cx: float, cy: float) -> DetectedObject:
    return DetectedObject(color, shape, cx, cy, 40)


def test_task_rules():
    red_circle, blue_square = ("red", "circle"), ("blue", "square")
    left = [obj("red", "circle", 5, 10), obj("blue", "square", 20, 12)]
    p = Prompt("position", "", (red_circle, blue_square), False, relation="left of")
    assert judge(p, left)
    assert not judge(
        Prompt("position", "", (red_circle, blue_square), False, relation="right of"), left
    )
    assert not judge(
        Prompt("position", "", (red_circle, blue_square), False, relation="above"), left
    )
    assert not judge(p, left[:1])  # the second object is missing
    attr = Prompt("color_attr", "", (red_circle, blue_square), False)
    swapped = [obj("blue", "circle", 5, 5), obj("red", "square", 20, 20)]
    assert judge(attr, left) and not judge(attr, swapped)
    assert judge(Prompt("two_object", "", (red_circle, blue_square), False), swapped)
    three = [obj("red", "circle", x, 5) for x in (1, 10, 20)]
    assert judge(Prompt("counting", "", (red_circle,), False, count=3), three)
    assert not judge(Prompt("counting", "", (red_circle,), False, count=2), three)
    assert judge(Prompt("colors", "", (red_circle,), False), three)
    assert not judge(Prompt("colors", "", (("blue", "circle"),), False), three)
    assert judge(Prompt("single_object", "", (("blue", "circle"),), False), three)


def test_scores_per_task_and_split_and_overall_is_the_mean_of_tasks():
    prompts = evaluation_prompts(CFG, per_task=2)
    per = 4
    # Right exactly on seen counting and on every held-out colour attribution image.
    right = [
        (p.task == "counting" and not p.heldout) or (p.task == "color_attr" and p.heldout)
        for p in prompts
        for _ in range(per)
    ]
    scores = task_scores(prompts, right)
    assert scores["seen"]["counting"] == 1.0 and scores["seen"]["color_attr"] == 0.0
    assert scores["heldout"]["color_attr"] == 1.0 and scores["heldout"]["counting"] == 0.0
    assert scores["seen"]["overall"] == pytest.approx(1 / 6)
    assert scores["heldout"]["overall"] == pytest.approx(1 / 6)
    assert scores["seen"]["images"]["position"] == 2 * per
    with pytest.raises(ValueError, match="judgements"):
        task_scores(prompts, right[:-1])


def test_judged_images_are_the_prompts_own_samples_in_order():
    # Two real renders of a red square; prompts asking for it and for something else.
    index = next(i for i in range(CFG.num_pairs) if sample_spec(CFG, i)["kind"] == "single")
    spec = sample_spec(CFG, index)
    want = (spec["color"], spec["shape"])
    other = next(c for c in CFG.colors if c != want[0])
    prompts = [
        Prompt("colors", "", (want,), False),
        Prompt("colors", "", ((other, want[1]),), False),
    ]
    image = as_evaluated(index, 32)
    assert judge_images(prompts, np.stack([image] * 4), PALETTE) == [True, True, False, False]
    with pytest.raises(ValueError, match="whole number"):
        judge_images(prompts, np.stack([image] * 3), PALETTE)


def first_of_kind(kind: str) -> int:
    return next(i for i in range(CFG.num_pairs) if sample_spec(CFG, i)["kind"] == kind)


def test_near_misses_count_as_told_apart_only_when_scored_below_the_caption():
    spec = sample_spec(CFG, first_of_kind("pair"))
    checks = sample_prompts(spec, CFG)
    vocab = sorted({p.caption for p, _ in checks})
    onehot = {c: np.eye(len(vocab))[i] for i, c in enumerate(vocab)}

    def encode(texts):
        return np.stack([onehot[t] for t in texts])

    swapped = next(p.caption for p, t in checks if p.task == "color_attr" and not t)
    embeddings = np.stack(
        [
            onehot[spec["caption"]],  # tells every near miss apart
            onehot[swapped] + 0.5 * onehot[spec["caption"]],  # prefers the swapped colours
            onehot[swapped],  # a tie with the caption is not told apart
        ]
    )
    acc = near_miss_accuracy(embeddings, [spec["caption"]] * 3, [checks] * 3, encode)
    assert acc == {"color_attr": pytest.approx(1 / 3), "two_object": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="check lists"):
        near_miss_accuracy(embeddings, [spec["caption"]] * 3, [checks] * 2, encode)


def test_a_picture_is_picked_only_when_its_caption_scores_it_above_the_swapped_one():
    x, y, z = np.eye(3)
    text = np.stack([x, x, x, y])
    own = np.stack([x, 0.5 * x, y, y])
    swapped = np.stack([y, x, 0.5 * x, y])  # picked, not (lower), not (other way), a tie: not
    assert picture_pick_accuracy(text, own, swapped) == pytest.approx(0.25)
    assert picture_pick_accuracy(text, swapped, own) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="swapped pictures"):
        picture_pick_accuracy(text, own, swapped[:3])


def test_true_checks_are_scored_on_the_image_drawn_for_them():
    pair, single = first_of_kind("pair"), first_of_kind("single")
    checks = sample_prompts(sample_spec(CFG, pair), CFG)
    # the pair's own render meets its checks; a one-object render meets neither of them
    images = np.stack([as_evaluated(pair, 32), as_evaluated(single, 32)])
    assert true_check_scores(images, [checks, checks], PALETTE) == {
        "color_attr": 0.5,
        "two_object": 0.5,
    }
    with pytest.raises(ValueError, match="check lists"):
        true_check_scores(images, [checks], PALETTE)
