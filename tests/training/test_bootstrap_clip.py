"""The bootstrap CLIP task: its data, contrastive loss, zero-shot metric and open_clip export."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_CLIP
from training_helpers import HOLDOUT, SOURCE, first_columns

from unclip.datasets.clip import load_clip
from unclip.datasets.config import ClipConfig
from unclip.datasets.stream import RankStream, StreamPlan
from unclip.training.config import BootstrapClipConfig
from unclip.training.models.bootstrap_clip import ClipTask, swapped_caption, train_bootstrap_clip


@pytest.fixture
def task(embedded_store) -> ClipTask:
    return ClipTask(embedded_store.layout, TINY_CLIP, [SOURCE], HOLDOUT)


def test_batches_are_normalized_images_and_tokens(task):
    batch = task.batch(first_columns(task, 5))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (5, TINY_CLIP.context_length)
    assert abs(float(batch["image"].mean())) < 3


def test_contrastive_loss_falls_on_one_batch(task):
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = task.batch(first_columns(task, 16))
    first = None
    for _ in range(15):
        loss, metrics = task.loss(model, batch)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first and "logit_scale" in metrics


def test_zero_shot_metric_and_export_load_with_open_clip(task, tmp_path):
    torch.manual_seed(0)
    model = task.build_model()
    metrics = task.evaluate(model)
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0
    assert metrics["zero_shot_classes"] >= 10 and metrics["holdout_images"] > 0
    task.export(model, str(tmp_path / "clip"))
    bundle = load_clip(TINY_CLIP, str(tmp_path / "clip"))
    assert bundle.embed_dim == TINY_CLIP.embed_dim
    with torch.no_grad():
        x = task.batch(first_columns(task, 2))["image"]
        assert torch.allclose(bundle.model.encode_image(x), model.eval().encode_image(x), atol=1e-5)


def test_the_resnet_tower_learns_and_exports_what_it_learnt(embedded_store, tmp_path):
    cfg = TINY_CLIP.model_copy(
        update={"vision_tower": "resnet", "vision_layers": 1, "vision_width": 8}
    )
    task = ClipTask(embedded_store.layout, cfg, [SOURCE], HOLDOUT)
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = task.batch(first_columns(task, 16))
    losses = []
    for _ in range(15):
        loss, _ = task.loss(model, batch)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.8 * losses[0], losses
    task.export(model, str(tmp_path / "clip"))
    bundle = load_clip(cfg, str(tmp_path / "clip"))
    with torch.no_grad():  # eval mode: the batch norms' running statistics travel too
        x = batch["image"][:4]
        assert torch.allclose(bundle.model.encode_image(x), model.eval().encode_image(x), atol=1e-5)


def test_a_pretrained_clip_is_not_bootstrapped(embedded_store):
    with pytest.raises(ValueError, match="bootstrap"):
        train_bootstrap_clip(
            embedded_store.layout,
            ClipConfig(model_name="ViT-B-32"),
            BootstrapClipConfig(),
            [SOURCE],
            HOLDOUT,
        )


def test_a_few_contrastive_steps_beat_the_untrained_clip_at_zero_shot(task):
    """Quality, not range: 20 steps on the tiny shapes lift zero-shot accuracy well above the
    untrained model's (0.12 of 18 classes; 0.36 after training)."""
    torch.manual_seed(0)
    model = task.build_model()
    before = task.evaluate(model)["zero_shot_accuracy"]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    source = task.data()
    stream = RankStream(source, StreamPlan.make(source.shards, 0, 1, 32, 4096, seed=0)).batches(0)
    for _ in range(20):
        loss, _ = task.loss(model, task.batch(next(stream)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = task.evaluate(model)["zero_shot_accuracy"]
    assert after > before + 0.15, (before, after)


def test_swapped_caption_exchanges_whole_words_both_ways():
    swaps = [("left", "right"), ("above", "below")]
    assert swapped_caption("a red circle left of a blue square", swaps) == (
        "a red circle right of a blue square"
    )
    assert swapped_caption("a red circle below a blue square", swaps) == (
        "a red circle above a blue square"
    )
    assert swapped_caption("two leftover squares", swaps) == "two leftover squares"


def test_hard_negatives_are_extra_texts_each_image_must_score_below_its_caption(task):
    import dataclasses

    import numpy as np
    import torch.nn.functional as F

    captions = [
        "a red circle left of a blue square",
        "a green square",
        "a blue triangle right of a red circle",
        "a red square",
    ]
    rng = np.random.default_rng(0)
    columns = {
        "image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "caption": np.array(captions, dtype=object),
    }
    hard = dataclasses.replace(task, negative_swaps=(("left", "right"),))
    plain_batch, hard_batch = task.batch(columns), hard.batch(columns)
    assert plain_batch["text"].shape[0] == 4
    assert hard_batch["text"].shape[0] == 6  # the two relation captions, inverted
    assert torch.equal(hard_batch["text"][:4], plain_batch["text"])
    assert torch.equal(
        hard_batch["text"][4:],
        task.tokenize(
            ["a red circle right of a blue square", "a blue triangle left of a red circle"]
        ),
    )
    assert hard.describe()["negative_swaps"] == [["left", "right"]]
    assert "negative_swaps" not in task.describe()

    torch.manual_seed(0)
    model = task.build_model().eval()
    with torch.no_grad():
        loss, _ = hard.loss(model, hard_batch)
        plain, _ = task.loss(model, plain_batch)
        image_f = model.encode_image(hard_batch["image"], normalize=True)
        text_f = model.encode_text(hard_batch["text"], normalize=True)
        scale = model.logit_scale.exp().clamp(max=100.0)
    labels = torch.arange(4)
    want = (
        F.cross_entropy(scale * image_f @ text_f.T, labels)
        + F.cross_entropy(scale * text_f[:4] @ image_f.T, labels)
    ) / 2
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(loss) > float(plain)  # more wrong texts in each image's softmax
    # with no hard negatives, the loss is open_clip's ClipLoss to the bit
    from open_clip.loss import ClipLoss

    with torch.no_grad():
        plain_f = model.encode_text(plain_batch["text"], normalize=True)
        assert torch.equal(plain, ClipLoss()(image_f, plain_f, scale))


def test_negative_swaps_change_the_run_name_only_when_set():
    from unclip.training.models.run_names import bootstrap_clip_run_name

    default = bootstrap_clip_run_name(TINY_CLIP, BootstrapClipConfig(), 0.1, [SOURCE])
    explicit = BootstrapClipConfig(negative_swaps=[])
    swaps = BootstrapClipConfig(negative_swaps=[("left", "right")])
    assert bootstrap_clip_run_name(TINY_CLIP, explicit, 0.1, [SOURCE]) == default
    assert bootstrap_clip_run_name(TINY_CLIP, swaps, 0.1, [SOURCE]) != default

    with pytest.raises(ValueError, match=r"\['left'\] appear more than once"):
        BootstrapClipConfig(negative_swaps=[("left", "right"), ("left", "above")])
