import json
import math

from unclip.datasets.storage import StorageLayout, write_json
from unclip.pipelines.config import PromotionMetric, parse_config
from unclip.pipelines.promotion import decide, promote, promoted

PRIOR = [PromotionMetric(metric="cos_pred_true", mode="max", tolerance=0.01)]
DECODER = [
    PromotionMetric(metric="fd_clip", mode="min", tolerance=0.5),
    PromotionMetric(metric="clip_score", mode="max", tolerance=0.0),
]


def test_first_ever_candidate_is_promoted():
    d = decide(PRIOR, {"cos_pred_true": 0.3}, None)
    assert d.promote and d.status == "first"


def test_better_candidate_is_promoted_worse_is_rejected():
    assert decide(PRIOR, {"cos_pred_true": 0.8}, {"cos_pred_true": 0.7}).promote
    d = decide(PRIOR, {"cos_pred_true": 0.6}, {"cos_pred_true": 0.7})
    assert not d.promote and d.status == "rejected"
    assert "worse" in d.reasons[0] and "cos_pred_true" in d.reasons[0]


def test_tolerance_lets_noise_pass_but_one_metric_must_improve():
    # fd_clip slightly worse (within 0.5), clip_score better: promoted
    d = decide(DECODER, {"fd_clip": 10.3, "clip_score": 0.31}, {"fd_clip": 10.0, "clip_score": 0.3})
    assert d.promote, d.reasons
    assert any("within tolerance" in r for r in d.reasons)
    # fd_clip worse beyond tolerance: rejected even though clip_score improved
    d = decide(DECODER, {"fd_clip": 10.6, "clip_score": 0.4}, {"fd_clip": 10.0, "clip_score": 0.3})
    assert not d.promote
    # lower is better for mode=min
    assert decide(
        DECODER, {"fd_clip": 9.0, "clip_score": 0.3}, {"fd_clip": 10.0, "clip_score": 0.3}
    ).promote
    # ties everywhere: nothing improved, so the promoted checkpoint stays
    d = decide(PRIOR, {"cos_pred_true": 0.695}, {"cos_pred_true": 0.7})
    assert not d.promote and "no metric improved" in d.reasons[-1]


def test_missing_or_nan_metric_rejects():
    d = decide(DECODER, {"fd_clip": 1.0}, None)
    assert not d.promote and "clip_score" in d.reasons[0]
    d = decide(PRIOR, {"cos_pred_true": math.nan}, {"cos_pred_true": 0.1})
    assert not d.promote


def _cfg(tmp_path):
    return parse_config(
        {
            "storage": str(tmp_path / "store"),
            "promotion": {
                "models": {"prior": [{"metric": "cos_pred_true", "mode": "max", "tolerance": 0.0}]}
            },
        }
    )


def _trained(layout, run, metric, version="v1"):
    write_json(
        layout.latest_run("prior"),
        {
            "run": run,
            "export": f"{layout.root}/runs/prior/{run}/export",
            "dataset_version": version,
        },
    )
    if metric is not None:
        write_json(layout.join("eval", run, "prior_metrics.json"), {"cos_pred_true": metric})


def test_promote_writes_registry_and_keeps_rejections_with_their_report(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)

    _trained(layout, "prior-a", 0.5)
    assert promote(cfg, "prior")["status"] == "first"
    rec = promoted(cfg, "prior")
    assert rec["run"] == "prior-a" and rec["metrics"]["cos_pred_true"] == 0.5
    assert rec["dataset_version"] == "v1" and rec["export"].endswith("prior-a/export")
    assert rec["config"]["num_layers"] == cfg.prior.num_layers
    # the same run again: no change, no report churn
    assert promote(cfg, "prior")["status"] == "current"

    _trained(layout, "prior-b", 0.4, "v2")
    out = promote(cfg, "prior")
    assert out["status"] == "rejected"
    assert promoted(cfg, "prior")["run"] == "prior-a"
    report = json.loads((tmp_path / "store/eval/prior-b/promotion.json").read_text())
    assert report["status"] == "rejected" and report["against"]["run"] == "prior-a"
    promote(cfg, "prior")  # idempotent: one rejection line per (candidate, promoted)
    lines = (tmp_path / "store/registry/prior.rejected.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run"] == "prior-b"

    _trained(layout, "prior-c", 0.6, "v3")
    assert promote(cfg, "prior")["status"] == "promoted"
    rec = promoted(cfg, "prior")
    assert rec["run"] == "prior-c" and rec["previous"] == "prior-a"


def test_missing_metrics_file_is_a_clear_rejection(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    _trained(layout, "prior-a", None)
    out = promote(cfg, "prior")
    assert out["status"] == "rejected" and not out["promote"]
    assert "prior_metrics.json is missing" in out["reasons"][0]
    assert promoted(cfg, "prior") is None
    report = json.loads((tmp_path / "store/eval/prior-a/promotion.json").read_text())
    assert "materialize `evaluation`" in report["reasons"][0]
