"""UnclipPipeline: save / load as a diffusers folder, bit-for-bit sampling, options, devices."""

from __future__ import annotations

import json
import os

import numpy as np
import open_clip
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from training_helpers import TINY_CLIP, export_untrained_cascade

from unclip.datasets.clip import build_bootstrap_clip, encode_texts, load_clip, save_clip
from unclip.training.inference import OpenClipModel, UnclipPipeline
from unclip.training.inference.call_options import row_batches
from unclip.training.inference.device import resolve_device
from unclip.training.sampling import generate

CAPTIONS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """An untrained tiny CLIP, prior (k = 1 by default) and decoder, exported as training does."""
    root = tmp_path_factory.mktemp("pipeline")
    return export_untrained_cascade(str(root))


@pytest.fixture(scope="module")
def saved(exports, tmp_path_factory):
    clip_dir, prior_dir, decoder_dir = exports
    pipe = UnclipPipeline.from_exports(decoder_dir, load_clip(TINY_CLIP, clip_dir), prior_dir)
    folder = str(tmp_path_factory.mktemp("saved") / "pipe")
    pipe.save_pretrained(folder)
    return folder


def _arrays(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_saved_folder_has_a_model_index_and_an_open_clip_folder(saved):
    with open(os.path.join(saved, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "UnclipPipeline"
    assert index["clip"] == ["unclip.training.inference.clip_model", "OpenClipModel"]
    assert index["prior"] == ["diffusers", "PriorTransformer"]
    assert index["decoder"] == ["diffusers", "UNet2DConditionModel"]
    assert index["upsampler"] == [None, None]
    assert index["decoder_info"]["image_size"] == 16
    # the CLIP folder is open_clip's own: its factory loads it without unclip
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{saved}/clip")
    tokens = open_clip.get_tokenizer(f"local-dir:{saved}/clip")(CAPTIONS)
    bundle = load_clip(TINY_CLIP, os.path.join(saved, "clip"))
    with torch.no_grad():
        mine = model.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_array_equal(mine, encode_texts(bundle, CAPTIONS))


def test_from_pretrained_reproduces_generate_bit_for_bit(exports, saved):
    clip_dir, prior_dir, decoder_dir = exports
    expected = generate(
        CAPTIONS,
        TINY_CLIP,
        clip_dir,
        prior_dir,
        decoder_dir,
        2,
        decoder_num_inference_steps=2,
        seed=3,
    )
    pipe = UnclipPipeline.from_pretrained(saved)
    out = pipe(CAPTIONS, num_images_per_prompt=2, decoder_num_inference_steps=2, seed=3)
    assert len(out.images) == 4 and out.images[0].size == (16, 16)
    np.testing.assert_array_equal(_arrays(out.images), _arrays(expected))
    other = pipe(CAPTIONS, num_images_per_prompt=2, decoder_num_inference_steps=2, seed=4)
    assert not np.array_equal(_arrays(other.images), _arrays(expected))


def test_plain_diffusers_loads_the_folder_with_its_pipeline_file(saved):
    pipe = DiffusionPipeline.from_pretrained(
        saved, custom_pipeline=os.path.join(saved, "unclip_pipeline.py"), trust_remote_code=True
    )
    assert type(pipe).__name__ == "UnclipPipeline"
    a = pipe("a red circle", decoder_num_inference_steps=2, output_type="np").images
    b = UnclipPipeline.from_pretrained(saved)(
        "a red circle", decoder_num_inference_steps=2, output_type="np"
    ).images
    assert a.dtype == np.uint8 and a.shape == (1, 16, 16, 3)
    np.testing.assert_array_equal(a, b)


def test_a_generator_seeds_the_noise_reproducibly(saved):
    pipe = UnclipPipeline.from_pretrained(saved)

    def run(seed: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed)
        return pipe(CAPTIONS, decoder_num_inference_steps=2, generator=g, output_type="np").images

    np.testing.assert_array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))
    with pytest.raises(ValueError, match="not both"):
        pipe(CAPTIONS, seed=1, generator=torch.Generator().manual_seed(1))


def test_batches_bound_the_rows_and_batch_i_uses_seed_plus_i(saved):
    pipe = UnclipPipeline.from_pretrained(saved)
    kw = {"decoder_num_inference_steps": 2, "output_type": "np"}
    batched = pipe(CAPTIONS, num_images_per_prompt=2, batch_size=2, seed=5, **kw).images
    assert batched.shape == (4, 16, 16, 3)
    first = pipe(["a red circle"], num_images_per_prompt=2, seed=5, **kw).images
    second = pipe(["a blue square"], num_images_per_prompt=2, seed=6, **kw).images
    # equal up to the last bit of the CLIP text encoder, which sees another batch here
    alone = np.concatenate([first, second]).astype(int)
    assert np.abs(batched - alone).max() <= 1 and (batched == alone).mean() > 0.99
    assert [(s.start, s.stop) for s in row_batches(5, 2)] == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(ValueError, match="batch_size"):
        row_batches(3, 0)


def test_candidates_keep_the_embedding_closest_to_the_text(saved):
    pipe = UnclipPipeline.from_pretrained(saved)
    prior = pipe.prior_sampler()
    text = torch.from_numpy(encode_texts(pipe.clip_bundle(), CAPTIONS))
    drawn = prior.sample(text.repeat_interleave(4, 0), steps=2, seed=11, candidates=1)
    best = prior.sample(text, steps=2, seed=11, candidates=4)
    scores = (drawn.view(2, 4, -1) * text[:, None]).sum(-1)
    expected = drawn.view(2, 4, -1)[torch.arange(2), scores.argmax(1)]
    torch.testing.assert_close(best, expected)


def test_variations_interpolation_and_embeddings(saved):
    pipe = UnclipPipeline.from_pretrained(saved)
    source = Image.new("RGB", (40, 40), (200, 30, 30))
    var = pipe.image_variations(source, num_images_per_image=3, decoder_num_inference_steps=2)
    assert len(var.images) == 3
    frames = pipe.interpolate(*CAPTIONS, frames=4, decoder_num_inference_steps=2).images
    assert len(frames) == 4 and frames[0].size == (16, 16)
    emb = np.random.default_rng(0).normal(size=(TINY_CLIP.embed_dim,)).astype(np.float32)
    (decoded,) = pipe.decode_image_embeddings(emb, decoder_num_inference_steps=2, return_dict=False)
    assert len(decoded) == 1
    kw = {"decoder_num_inference_steps": 2, "output_type": "np"}
    same = [pipe.decode_image_embeddings(emb, seed=s, **kw).images for s in (7, 7, 8)]
    assert isinstance(same[0], np.ndarray) and same[0].dtype == np.uint8
    assert np.array_equal(same[0], same[1]) and not np.array_equal(same[0], same[2])


def test_bad_requests_are_clear_errors(saved, exports):
    pipe = UnclipPipeline.from_pretrained(saved)
    with pytest.raises(ValueError, match="empty caption"):
        pipe(["a red circle", "  "])
    with pytest.raises(ValueError, match="guidance"):
        pipe(CAPTIONS, decoder_guidance_scale=0.0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(CAPTIONS, output_type="latent")
    with pytest.raises(ValueError, match="prior guidance"):
        pipe.interpolate(*CAPTIONS, prior_guidance_scale=-1.0)
    with pytest.raises(TypeError, match=r"image_variations\(\).*'decoder_steps'"):
        pipe.image_variations(Image.new("RGB", (8, 8)), decoder_steps=2)
    with pytest.raises(TypeError):  # the decoding options are keywords only
        pipe(CAPTIONS, 1, None, None, None, 2)
    _, _, decoder_dir = exports
    no_clip = UnclipPipeline.from_exports(decoder_dir)
    with pytest.raises(ValueError, match="no CLIP"):
        no_clip(CAPTIONS)
    other = OpenClipModel.from_bundle(
        load_clip(TINY_CLIP, save_clip(_other_clip(), TINY_CLIP, f"{saved}-other"))
    )
    with pytest.raises(ValueError, match="trained on embeddings of CLIP"):
        UnclipPipeline.from_exports(decoder_dir, other)


def _other_clip() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_bootstrap_clip(TINY_CLIP)


def test_dtype_and_device_move_every_component(saved):
    pipe = UnclipPipeline.from_pretrained(saved, dtype=torch.bfloat16).to("cpu")
    assert pipe.prior.dtype == pipe.decoder.dtype == pipe.clip.dtype == torch.bfloat16
    out = pipe("a red circle", decoder_num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3)
    assert str(pipe.decoder_sampler().device) == "cpu"


def test_device_selection():
    assert resolve_device("auto", gpus_available=0) == "cpu"
    assert resolve_device("auto", gpus_available=2) == "cuda"
    assert resolve_device("cpu", gpus_available=2) == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda", gpus_available=0)
    with pytest.raises(ValueError, match="device must be"):
        resolve_device("tpu")
