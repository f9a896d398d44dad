"""What the Dagster UI shows of an evaluation (metrics, report, inline grid) and a promotion."""

from __future__ import annotations

import base64

import dagster as dg
import numpy as np
from PIL import Image

from unclip.pipelines import ui_metadata
from unclip.pipelines.ui_metadata import evaluation_metadata, promotion_metadata
from unclip.pipelines.values import PromotionOutcome
from unclip.training.evaluation.trained_cascade import CascadeEvaluation


def _evaluation(tmp_path, grid: str) -> CascadeEvaluation:
    return CascadeEvaluation(
        prior_metrics_path=str(tmp_path / "prior_metrics.json"),
        sample_grid=grid,
        decoder_metrics_path=str(tmp_path / "decoder_metrics.json"),
        report=str(tmp_path / "report.html"),
        prior_metrics={"cos_pred_true": 0.98},
        cascade_metrics={"fd_clip": 0.01, "attribute_accuracy": 0.9},
    )


def test_evaluation_shows_metrics_the_report_and_the_grid_inline(tmp_path, monkeypatch):
    grid = tmp_path / "samples.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(grid)
    meta = evaluation_metadata(_evaluation(tmp_path, str(grid)))
    assert meta["cos_pred_true"] == 0.98 and meta["fd_clip"] == 0.01
    assert meta["report"] == dg.MetadataValue.path(str(tmp_path / "report.html"))
    text = meta["samples"].value
    assert text.startswith("![samples](data:image/png;base64,")
    assert base64.b64decode(text.split(",", 1)[1].rstrip(")")) == grid.read_bytes()
    # a grid too large for the event log is linked, a missing one is named
    monkeypatch.setattr(ui_metadata, "INLINE_IMAGE_BYTES", 10)
    assert evaluation_metadata(_evaluation(tmp_path, str(grid)))["samples"] == (
        dg.MetadataValue.path(str(grid))
    )
    missing = evaluation_metadata(_evaluation(tmp_path, str(tmp_path / "none.png")))["samples"]
    assert "does not exist" in missing.value


def test_promotion_shows_each_models_decision_and_run():
    meta = promotion_metadata(
        [
            PromotionOutcome("prior", "prior-1", "current", True),
            PromotionOutcome("decoder", "decoder-2", "rejected", False, ["fd_clip worse"]),
        ]
    )
    assert meta == {
        "prior": "promoted · current · prior-1",
        "decoder": "not promoted · rejected · decoder-2",
    }
