"""Fixtures for unclip.training (helpers live in ``tests/training_helpers.py``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # training_helpers imports Ray, open_clip and diffusers: seconds a test file
    from training_helpers import EmbeddedStore

# Ray Train's controller polls workers every 2 s by default and a report waits for that poll;
# set before the module-scoped ``ray_local`` starts Ray, whose processes inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedStore:
    from training_helpers import build_embedded_store

    return build_embedded_store(str(tmp_path_factory.mktemp("embedded")))
