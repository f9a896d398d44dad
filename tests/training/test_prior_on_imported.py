"""The prior trains on imported embeddings (no image shards, no CLIP loaded, nothing re-embedded)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from tiny import tiny_trainer
from training_helpers import HOLDOUT, TINY_DECODER, TINY_PRIOR

from unclip.datasets.embedding_import import ImportSpec, import_embeddings
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.readers import load_manifest
from unclip.datasets.storage import StorageLayout
from unclip.datasets.synthetic_embeddings import write_clip_retrieval
from unclip.training.models.decoder import DecoderTask
from unclip.training.models.prior import train_prior


def test_prior_trains_on_an_import_and_the_decoder_refuses_it(tmp_path, ray_local):
    src = tmp_path / "laion"
    write_clip_retrieval(str(src), [40, 24], 16, seed=4)
    layout = StorageLayout(str(tmp_path / "store"))
    spec = ImportSpec(
        str(src), "clip-retrieval", "ViT-L-14", "laion2b_s32b_b82k", rows_per_shard=32
    )
    record = import_embeddings(layout, spec)
    version = assemble_manifest(layout, record["clip_id"], [record["source"]])["version"]
    cfg = TINY_PRIOR.model_copy(update={"trainer": tiny_trainer(max_steps=3, checkpoint_every=3)})
    fit = train_prior(layout, version, cfg, HOLDOUT)
    assert not fit.skipped and np.isfinite(fit.metrics["loss"])
    assert os.path.isfile(os.path.join(fit.export_dir, "prior", "config.json"))
    assert not list((tmp_path / "store").glob("images/**/*.tar"))  # nothing downloaded or made
    decoder = DecoderTask.from_manifest(layout, version, TINY_DECODER, HOLDOUT)
    with pytest.raises(ValueError, match="have embeddings only"):
        decoder.stream_source(load_manifest(layout, version))
