"""Prior and decoder tasks hold only their rank's equal share of the data, fixed by the seed."""

from __future__ import annotations

import numpy as np
import pytest

from unclip.datasets import readers
from unclip.training.config import DecoderConfig, PriorConfig
from unclip.training.decoder import DecoderTask
from unclip.training.prior import PriorTask
from unclip.training.train_loop import batch_indices

HOLDOUT = 0.2


@pytest.mark.parametrize("world", [1, 2, 3])
def test_prior_ranks_hold_equal_disjoint_shares_and_serve_their_batches(embedded_store, world):
    store = embedded_store
    train = readers.load_embeddings(store.layout, store.manifest, "train", HOLDOUT)
    tasks = [
        PriorTask.from_manifest(store.layout, store.version, PriorConfig(), HOLDOUT)
        for _ in range(world)
    ]
    totals = [t.load_data(r, world) for r, t in enumerate(tasks)]
    n = len(train.keys) // world
    assert totals == [n * world] * world
    held = [t._data["image"].rows for t in tasks]  # image embeddings: unique per sample
    assert all(len(h) == n for h in held)  # a share, not the whole data set
    assert len(np.unique(np.concatenate(held), axis=0)) == n * world  # disjoint shares
    texts = {tuple(np.round(v, 4)) for v in train.text}
    assert all(tuple(np.round(v, 4)) in texts for t in tasks for v in t._data["text"].rows)
    for r, t in enumerate(tasks):  # every batch the trainer draws for rank r is in its block
        for k in range(5):
            batch = t.batch(batch_indices(k, totals[r], 4, r, world, seed=0))
            assert batch["text"].shape == (4, store.manifest["embedding_dim"])
    again = PriorTask.from_manifest(store.layout, store.version, PriorConfig(), HOLDOUT)
    again.load_data(world - 1, world)
    np.testing.assert_array_equal(again._data["image"].rows, tasks[-1]._data["image"].rows)


def test_decoder_ranks_hold_equal_shares_of_joined_images(embedded_store):
    store = embedded_store
    cfg = DecoderConfig(image_size=16, block_out_channels=[16, 32], attention_head_dim=8)
    tasks = [DecoderTask.from_manifest(store.layout, store.version, cfg, HOLDOUT) for _ in "ab"]
    totals = [t.load_data(r, 2) for r, t in enumerate(tasks)]
    assert totals[0] == totals[1] and totals[0] % 2 == 0
    n = totals[0] // 2
    assert [t._data["images"].shape for t in tasks] == [(n, 16, 16, 3)] * 2
    b = tasks[1].batch(batch_indices(3, totals[1], 4, 1, 2, seed=0))
    assert b["images"].shape == (4, 3, 16, 16) and b["image_emb"].shape[0] == 4
    with pytest.raises(IndexError, match="outside this worker's block"):
        tasks[1].batch(np.array([0]))  # rank 0's row: not held by rank 1
