"""A config over real data is checked against it at load: gates, sample captions, image size."""

import warnings

import pytest

from unclip.datasets.embedding_import import ImportSpec, import_embeddings
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.readers import in_holdout
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic_embeddings import write_clip_retrieval
from unclip.pipelines.config import ConfigError, parse_config
from unclip.training.config import SHAPE_CAPTIONS
from unclip.training.evaluation.trained_cascade import grid_captions


def _decoder_gates(cfg):
    return [g.metric for g in cfg.promotion.models["decoder"]]


def test_without_the_synthetic_set_the_default_gates_have_no_shape_metric():
    real = parse_config({"storage": "x", "sources": ["a.parquet"]})
    assert _decoder_gates(real) == ["fd_clip", "clip_score"]
    assert real.evaluate.captions is None
    demo = parse_config({"storage": "x", "synthetic": {}})
    assert _decoder_gates(demo) == ["fd_clip", "clip_score", "attribute_accuracy"]
    # promotion given without its models: the models still default to what fits the data
    other = parse_config({"storage": "x", "promotion": {}})
    assert _decoder_gates(other) == ["fd_clip", "clip_score"]
    # the upsampler, judged by the same cascade metrics, gets the decoder's gates
    for cfg in (real, demo, other):
        assert cfg.promotion.models["upsampler"] == cfg.promotion.models["decoder"]


def test_a_shape_metric_gate_without_the_synthetic_set_names_the_key():
    raw = {
        "storage": "x",
        "promotion": {
            "models": {"decoder": [{"metric": "clip_score"}, {"metric": "attribute_accuracy"}]}
        },
    }
    with pytest.raises(
        ConfigError,
        match=r"promotion\.models\.decoder\[1\]\.metric: 'attribute_accuracy' exists only",
    ):
        parse_config(raw)
    parse_config({**raw, "synthetic": {}})  # with the shapes it is a fine gate


def test_shape_captions_without_the_synthetic_set_are_an_error():
    with pytest.raises(ConfigError, match=r"evaluate\.captions: these are the synthetic shapes"):
        parse_config({"storage": "x", "evaluate": {"captions": SHAPE_CAPTIONS}})
    parse_config({"storage": "x", "evaluate": {"captions": ["a dog on a beach"]}})


def test_an_image_size_below_the_clips_input_warns():
    raw = {"storage": "x", "clip": {"model_name": "ViT-B-32"}}
    with pytest.warns(
        UserWarning, match=r"ingest\.image_size 64 is below the CLIP's input size 224"
    ):
        parse_config(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config({**raw, "ingest": {"image_size": 224}})
        parse_config(
            {"storage": "x", "clip": {"model_name": "not-a-known-model"}}
        )  # unknown: quiet
    with pytest.warns(UserWarning, match="input size 64 \\(bootstrap\\)"):
        parse_config({"storage": "x", "ingest": {"image_size": 32}})


def test_grid_captions_default_to_held_out_captions_of_the_data(tmp_path):
    src = tmp_path / "emb"
    write_clip_retrieval(str(src), [40], 8)
    layout = StorageLayout(str(tmp_path / "store"))
    record = import_embeddings(layout, ImportSpec(str(src), "clip-retrieval", "m", "t"))
    manifest = assemble_manifest(layout, record["clip_id"], [record["source"]])
    cfg = parse_config({"storage": str(tmp_path / "store"), "evaluate": {"holdout_fraction": 0.3}})
    captions = grid_captions(layout, manifest["version"], cfg.evaluate, 0.3, shapes=False)
    assert len(captions) == 4 == len(set(captions))
    keys = {f"a photo 0-{i}": f"{record['source']}/00000_{i:09d}" for i in range(40)}
    assert all(in_holdout(keys[c], 0.3) for c in captions)
    assert grid_captions(layout, manifest["version"], cfg.evaluate, 0.3, shapes=True) == (
        SHAPE_CAPTIONS
    )
    given = cfg.evaluate.model_copy(update={"captions": ["a dog"]})
    assert grid_captions(layout, manifest["version"], given, 0.3, shapes=False) == ["a dog"]


def test_bootstrap_only_clip_keys_beside_a_named_model_are_an_error_naming_them():
    with pytest.raises(
        ConfigError,
        match=r"clip\.embed_dim: a bootstrap-only key .*remove clip\.embed_dim, clip\.image_size",
    ):
        parse_config(
            {
                "storage": "x",
                "clip": {"model_name": "ViT-B-32", "embed_dim": 512, "image_size": 224},
            }
        )
    boot = parse_config({"storage": "x", "clip": {"embed_dim": 32, "image_size": 32}})
    assert (boot.clip.embed_dim, boot.clip.model_name) == (32, None)
