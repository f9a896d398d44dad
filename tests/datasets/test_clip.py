"""open_clip models: bootstrap architecture, open_clip-loadable checkpoints, local weights, clip_id."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from unclip.datasets.clip import (
    bootstrap_config_of,
    bootstrap_model_config,
    build_bootstrap_clip,
    encode_images,
    encode_texts,
    load_clip,
    save_clip,
)
from unclip.datasets.clip_records import load_clip_from_record
from unclip.datasets.config import ClipConfig

IMAGES = [Image.new("RGB", (48, 40), c) for c in [(255, 0, 0), (0, 200, 0), (10, 10, 240)]]
TEXTS = ["a red circle", "a green square", "a blue triangle"]


def test_bootstrap_is_open_clip_clip_of_configured_size(tiny_clip_cfg):
    model = build_bootstrap_clip(tiny_clip_cfg)
    assert isinstance(model, open_clip.CLIP)
    assert model.visual.image_size == (32, 32)
    assert model.context_length == 16
    assert model.text_projection.shape[1] == 32


def test_the_resnet_tower_is_open_clips_with_attention_pooling_and_round_trips(
    tiny_clip_cfg, tmp_path
):
    cfg = tiny_clip_cfg.model_copy(
        update={"vision_tower": "resnet", "vision_layers": 1, "vision_width": 8}
    )
    torch.manual_seed(0)
    model = build_bootstrap_clip(cfg).eval()
    assert isinstance(model.visual, open_clip.model.ModifiedResNet)
    assert [len(model.visual.get_submodule(f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert model.visual.attnpool.positional_embedding.shape[0] == 1 + (32 // 32) ** 2
    directory = save_clip(model, cfg, str(tmp_path / "ckpt"))
    bundle = load_clip(cfg, directory)
    with torch.no_grad():
        x = torch.stack([bundle.preprocess(im) for im in IMAGES])
        expected = model.encode_image(x, normalize=True).numpy()
    emb = encode_images(bundle, IMAGES)
    np.testing.assert_array_equal(emb, expected)  # the saved tower is the built one
    assert emb.shape == (3, cfg.embed_dim)
    assert not np.allclose(emb[0], emb[1])  # it sees the colours
    # open_clip itself builds the same tower from the saved folder
    m2, _, _ = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    assert isinstance(m2.visual, open_clip.model.ModifiedResNet)

    # a record naming a weights file of this tower loads it (the bootstrap architecture's path)
    weights = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), weights)
    record = {
        "source": str(weights),
        "model_cfg": bootstrap_model_config(cfg),
        "clip_id": bundle.clip_id,
    }
    np.testing.assert_array_equal(encode_images(load_clip_from_record(record), IMAGES), emb)

    with pytest.raises(ValueError, match=r"image_size \(48\) must be divisible by 32"):
        build_bootstrap_clip(cfg.model_copy(update={"image_size": 48}))
    with pytest.raises(ValueError, match="clip.vision_tower: a bootstrap-only key"):
        ClipConfig(model_name="ViT-B-32", vision_tower="resnet")


def test_widths_not_divisible_by_heads_are_named():
    with pytest.raises(ValueError, match=r"^clip: vision_width \(130\) must be divisible by heads"):
        bootstrap_model_config(ClipConfig(vision_width=130, heads=4))
    # the ResNet tower's attention pool has heads of its own width: only the text width counts
    resnet = ClipConfig(vision_tower="resnet", vision_width=30, heads=4)
    assert bootstrap_model_config(resnet)["vision_cfg"]["width"] == 30
    with pytest.raises(ValueError, match=r"^clip: text_width \(130\) must be divisible by heads"):
        bootstrap_model_config(resnet.model_copy(update={"text_width": 130}))


@pytest.mark.parametrize("tower", [{}, {"vision_tower": "resnet", "vision_layers": 2}])
def test_bootstrap_config_of_inverts_bootstrap_model_config(tiny_clip_cfg, tower):
    cfg = tiny_clip_cfg.model_copy(update=tower)
    model_cfg = bootstrap_model_config(cfg)
    assert bootstrap_config_of(model_cfg) == cfg
    assert bootstrap_model_config(bootstrap_config_of(model_cfg)) == model_cfg


def test_save_load_round_trip_and_open_clip_loads_the_dir(tiny_clip_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_bootstrap_clip(tiny_clip_cfg).eval()
    directory = save_clip(model, tiny_clip_cfg, str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporaries left
    bundle = load_clip(tiny_clip_cfg, directory)
    assert bundle.embed_dim == 32 and len(bundle.clip_id) == 16

    with torch.no_grad():
        x = torch.stack([bundle.preprocess(im) for im in IMAGES])
        expected_img = model.encode_image(x, normalize=True).numpy()
        expected_txt = model.encode_text(bundle.tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_array_equal(encode_images(bundle, IMAGES), expected_img)
    np.testing.assert_array_equal(encode_texts(bundle, TEXTS), expected_txt)
    np.testing.assert_allclose(np.linalg.norm(expected_img, axis=1), 1, atol=1e-5)

    # open_clip itself, with no unclip code in between
    m2, _, pre = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tok = open_clip.get_tokenizer(f"local-dir:{directory}")
    with torch.no_grad():
        e2 = m2.eval().encode_text(tok(TEXTS), normalize=True).numpy()
    np.testing.assert_array_equal(e2, expected_txt)
    assert tok(TEXTS).shape == (3, 16)

    # same weights again: same id; re-saving over the dir works; other weights: other id
    assert (
        load_clip(tiny_clip_cfg, save_clip(model, tiny_clip_cfg, directory)).clip_id
        == bundle.clip_id
    )
    with torch.no_grad():
        model.logit_scale.add_(1.0)
    save_clip(model, tiny_clip_cfg, directory)
    assert load_clip(tiny_clip_cfg, directory).clip_id != bundle.clip_id


def test_pretrained_local_state_dict_file(tiny_clip_cfg, tmp_path):
    """The open_clip name + pretrained=<local file> path, with a registered tiny config."""
    name = "unclip-test-tiny"
    (tmp_path / f"{name}.json").write_text(json.dumps(bootstrap_model_config(tiny_clip_cfg)))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(1)
    model = build_bootstrap_clip(tiny_clip_cfg).eval()
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)

    cfg = tiny_clip_cfg.model_copy(update={"model_name": name, "pretrained": str(weights)})
    bundle = load_clip(cfg)
    with torch.no_grad():
        expected = model.encode_text(bundle.tokenizer(TEXTS), normalize=True).numpy()
    np.testing.assert_array_equal(encode_texts(bundle, TEXTS), expected)
    # the same weights through save_clip/local-dir: the same identity, the same clip_id
    saved = load_clip(tiny_clip_cfg, save_clip(model, tiny_clip_cfg, str(tmp_path / "dir")))
    assert saved.clip_id == bundle.clip_id

    # without a model name, a weights file is read into the bootstrap architecture
    boot = load_clip(tiny_clip_cfg.model_copy(update={"pretrained": str(weights)}))
    assert boot.clip_id == bundle.clip_id
    # a directory in open_clip's hf-hub layout given as `pretrained`
    by_dir = load_clip(tiny_clip_cfg.model_copy(update={"pretrained": str(tmp_path / "dir")}))
    assert by_dir.clip_id == bundle.clip_id

    with pytest.raises(RuntimeError, match="not a known tag or valid file path"):
        load_clip(cfg.model_copy(update={"pretrained": str(tmp_path / "missing.pt")}))


def test_load_clip_needs_a_model(tiny_clip_cfg, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint and no model_name"):
        load_clip(tiny_clip_cfg)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        load_clip(tiny_clip_cfg, str(tmp_path))
