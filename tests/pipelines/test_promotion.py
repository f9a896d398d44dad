import json
import math
import threading
import time
from collections import Counter

import pytest

from unclip.datasets.storage import StorageLayout, write_json
from unclip.pipelines import registry
from unclip.pipelines.config import (
    ConfigError,
    PromotionMetric,
    load_config,
    parse_config,
)
from unclip.pipelines.promotion import context_diff, context_of, decide, promote, promoted

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


def context(version):
    """What the prior evaluation records beside its cosines (data, split, CLIP, protocol)."""
    return {
        "data_version": version,
        "split": "holdout",
        "holdout_fraction": 0.05,
        "clip_id": "clip0",
        "num_pairs": 25,
        "sample_steps": 4,
        "guidance_scale": 1.0,
        "candidates": 1,
    }


def _trained(layout, run, metric, version="v1", num_layers=1):
    """A finished run as the trainer leaves it (export marker) with its evaluation metrics."""
    export = f"{layout.root}/runs/prior/{run}/export"
    record = {"run": run, "export": export, "dataset_version": version}
    write_json(layout.latest_run("prior"), record)
    write_json(
        f"{export}/fit.json",
        {
            "run_name": run,
            "model_kind": "prior",
            "task": {
                "model": "prior",
                "prior": {"num_layers": num_layers},
                "data_version": version,
                "holdout_fraction": 0.05,
            },
            "trainer": {"max_steps": 7},
            "metrics": {},
        },
    )
    if metric is not None:
        write_json(
            layout.join("eval", run, "prior_metrics.json"),
            {"cos_pred_true": metric, **context(version)},
        )
    return record


def test_promote_writes_registry_and_keeps_rejections_with_their_report(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)

    _trained(layout, "prior-a", 0.5)
    assert promote(cfg, "prior")["status"] == "first"
    rec = promoted(cfg, "prior")
    assert rec["run"] == "prior-a" and rec["metrics"]["cos_pred_true"] == 0.5
    assert rec["dataset_version"] == "v1" and rec["export"].endswith("prior-a/export")
    # The run's own config (its export marker), not the promoting process's.
    assert rec["config"]["num_layers"] == 1 != cfg.prior.num_layers
    assert rec["config"]["trainer"] == {"max_steps": 7}
    # the same run again: no change, no report churn
    before = (tmp_path / "store/registry/prior.json").read_bytes()
    out = promote(cfg, "prior")
    assert out["status"] == "current" and not out["promote"]
    assert (tmp_path / "store/registry/prior.json").read_bytes() == before
    first = json.loads((tmp_path / "store/eval/prior-a/promotion.json").read_text())
    assert first["status"] == "first"

    _trained(layout, "prior-b", 0.4)
    out = promote(cfg, "prior")
    assert out["status"] == "rejected"
    assert promoted(cfg, "prior")["run"] == "prior-a"
    report = json.loads((tmp_path / "store/eval/prior-b/promotion.json").read_text())
    assert report["status"] == "rejected" and report["against"]["run"] == "prior-a"
    promote(cfg, "prior")  # idempotent: one rejection line per (candidate, promoted)
    lines = (tmp_path / "store/registry/prior.rejected.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run"] == "prior-b"

    _trained(layout, "prior-c", 0.6)
    assert promote(cfg, "prior")["status"] == "promoted"
    rec = promoted(cfg, "prior")
    assert rec["run"] == "prior-c" and rec["previous"] == "prior-a"


def test_one_rejection_line_per_candidate_and_promoted_pair(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    log = tmp_path / "store/registry/prior.rejected.jsonl"

    def lines():
        return [(x["run"], x["against"]) for x in map(json.loads, log.read_text().splitlines())]

    promote(cfg, "prior", run=_trained(layout, "prior-a", 0.5))
    z, y = _trained(layout, "prior-z", 0.4), _trained(layout, "prior-y", 0.45)
    promote(cfg, "prior", run=z)
    promote(cfg, "prior", run=y)  # other candidates against the same promoted run
    promote(cfg, "prior", run=_trained(layout, "prior-zz", 0.45))
    seen = [("prior-z", "prior-a"), ("prior-y", "prior-a"), ("prior-zz", "prior-a")]
    assert lines() == seen
    promote(cfg, "prior", run=_trained(layout, "prior-c", 0.6))
    promote(cfg, "prior", run=z)  # the same candidate against other promoted runs
    promote(cfg, "prior", run=_trained(layout, "prior-b2", 0.7))
    promote(cfg, "prior", run=z)
    promote(cfg, "prior", run=z)
    assert lines() == [*seen, ("prior-z", "prior-c"), ("prior-z", "prior-b2")]


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


# --- like with like ---------------------------------------------------------------------------


def test_a_tie_is_not_promoted():
    d = decide(PRIOR, {"cos_pred_true": 0.7}, {"cos_pred_true": 0.7})
    assert not d.promote and d.status == "rejected"
    assert "within tolerance" in d.reasons[0] and d.reasons[-1] == "no metric improved"


def test_a_metric_the_promoted_checkpoint_lacks_is_a_reason_not_a_win():
    d = decide(DECODER, {"fd_clip": 9.0, "clip_score": 0.4}, {"fd_clip": 10.0})
    assert not d.promote and d.status == "refused"
    assert d.reasons == [
        "the promoted checkpoint has no finite value for 'clip_score': no comparison"
    ]
    d = decide(DECODER, {"fd_clip": 9.0, "clip_score": 0.4}, {"fd_clip": 10.0, "clip_score": None})
    assert not d.promote and "'clip_score'" in d.reasons[0]


def test_metrics_of_another_data_version_are_not_compared_without_a_reevaluation(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    _trained(layout, "prior-a", 0.5, "v1")
    assert promote(cfg, "prior")["status"] == "first"
    _trained(layout, "prior-b", 0.9, "v2")  # a refreshed data set: an easier hold-out, maybe
    out = promote(cfg, "prior")
    assert out["status"] == "refused" and not out["promote"]
    assert "data_version: 'v1' vs 'v2'" in out["reasons"][0]
    assert promoted(cfg, "prior")["run"] == "prior-a"
    line = json.loads((tmp_path / "store/registry/prior.rejected.jsonl").read_text())
    assert line["status"] == "refused" and line["against"] == "prior-a"


def test_the_promoted_model_is_judged_by_its_numbers_in_the_candidates_context(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    _trained(layout, "prior-a", 0.5, "v1")
    promote(cfg, "prior")
    _trained(layout, "prior-b", 0.6, "v2")
    seen = []

    def reevaluate(model, current, cand):
        seen.append((model, current["run"], cand["run"]))
        return {"cos_pred_true": 0.65, **context(cand["metrics"]["data_version"])}

    out = promote(cfg, "prior", reevaluate=reevaluate)
    # 0.6 beats the stored 0.5 (v1) but not 0.65, the promoted model's score on v2.
    assert out["status"] == "rejected" and "vs promoted 0.65" in out["reasons"][0]
    assert seen == [("prior", "prior-a", "prior-b")]
    kept = json.loads(
        (tmp_path / "store/eval/prior-b/against/prior-a/prior_metrics.json").read_text()
    )
    assert kept["cos_pred_true"] == 0.65 and kept["data_version"] == "v2"
    report = json.loads((tmp_path / "store/eval/prior-b/promotion.json").read_text())
    assert report["against"]["metrics"]["cos_pred_true"] == 0.65
    # Judged again: the stored re-evaluation is used, nothing runs twice.
    assert promote(cfg, "prior", reevaluate=reevaluate)["status"] == "rejected"
    assert len(seen) == 1

    def elsewhere(model, current, cand):
        return {"cos_pred_true": 0.1, **context("v1")}

    _trained(layout, "prior-c", 0.6, "v3")
    out = promote(cfg, "prior", reevaluate=elsewhere)
    assert (
        out["status"] == "refused"
        and "still differs: data_version: 'v1' vs 'v3'" in out["reasons"][0]
    )


def test_context_is_everything_but_the_model_under_test():
    base = {"cos_pred_true": 0.3, **context("v1")}
    for key, value in [
        ("data_version", "v2"),
        ("split", "train"),
        ("holdout_fraction", 0.1),
        ("clip_id", "clip1"),
        ("num_pairs", 24),
        ("sample_steps", 5),
        ("guidance_scale", 2.0),
        ("candidates", 2),
    ]:
        assert context_of("prior", base) != context_of("prior", {**base, key: value}), key
    assert context_of("prior", base) == context_of("prior", {**base, "cos_pred_true": 0.9})
    # A model name built at run time (a caller's argument, not a literal) is compared by value.
    runtime_prior = "".join(["pri", "or"])
    assert context_of(runtime_prior, base) == context_of("prior", base)
    # A difference is one whichever side holds the larger value.
    newer = {**base, "data_version": "v2"}
    assert context_diff("prior", base, newer) == ["data_version: 'v1' vs 'v2'"]
    assert context_diff("prior", newer, base) == ["data_version: 'v2' vs 'v1'"]
    assert context_diff("prior", base, {**base, "cos_pred_true": 0.9}) == []
    cascade = {
        "data_version": "v1",
        "holdout_fraction": 0.1,
        "num_samples": 8,
        "settings": {"prior_run": "p", "decoder_run": "d1", "cascade": {}, "eval_seed": 0},
    }
    other_decoder = {**cascade, "settings": {**cascade["settings"], "decoder_run": "d2"}}
    assert context_of("decoder", cascade) == context_of("decoder", other_decoder)
    assert context_of("upsampler", cascade) != context_of("upsampler", other_decoder)
    other_prior = {**cascade, "settings": {**cascade["settings"], "prior_run": "q"}}
    assert context_of("decoder", cascade) != context_of("decoder", other_prior)
    for key in ("data_version", "holdout_fraction", "num_samples"):
        assert context_of("decoder", cascade) != context_of("decoder", {**cascade, key: 0}), key


def test_an_export_without_its_trainer_marker_is_not_promoted(tmp_path):
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    rec = _trained(layout, "prior-a", 0.5)
    (tmp_path / "store/runs/prior/prior-a/export/fit.json").unlink()
    out = promote(cfg, "prior", run=rec)
    assert out["status"] == "refused" and "fit.json is missing" in out["reasons"][0]
    assert promoted(cfg, "prior") is None


# --- config -----------------------------------------------------------------------------------


def test_a_misspelt_gate_metric_is_a_config_error_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "storage: s\npromotion:\n  models:\n    decoder:\n"
        "      - {metric: fd_clip, mode: min}\n      - {metric: clip_scor}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "promotion.models.decoder[1].metric: 'clip_scor' is not a metric" in str(e.value)
    assert "clip_score" in str(e.value)


# --- concurrent promotions --------------------------------------------------------------------


def test_two_concurrent_promotions_keep_the_better_candidate(tmp_path):
    """Both read the registry before either writes; the worse one writes last."""
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    _trained(layout, "prior-0", 0.5, "v1")
    promote(cfg, "prior")
    runs = {"prior-a": _trained(layout, "prior-a", 0.6, "v2")}
    runs["prior-b"] = _trained(layout, "prior-b", 0.8, "v2")
    both_read = threading.Barrier(2)
    calls = Counter()

    def reevaluate(model, current, cand):
        calls[cand["run"]] += 1
        if calls[cand["run"]] == 1:
            both_read.wait(timeout=30)
            if cand["run"] == "prior-a":
                time.sleep(0.3)  # the worse candidate writes last
        return {"cos_pred_true": current["metrics"]["cos_pred_true"], **context("v2")}

    results = {}

    def run(name):
        results[name] = promote(cfg, "prior", run=runs[name], reevaluate=reevaluate)

    threads = [threading.Thread(target=run, args=(n,)) for n in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["prior-b"]["status"] == "promoted"
    assert results["prior-a"]["status"] == "rejected"  # judged again, against prior-b
    assert "vs promoted 0.8" in results["prior-a"]["reasons"][0]
    rec = promoted(cfg, "prior")
    assert rec["run"] == "prior-b" and rec["previous"] == "prior-0"
    assert not (tmp_path / "store/registry/prior.lock").exists()


def test_a_registry_that_changes_on_every_try_is_given_up_after_20_judgements(tmp_path):
    """Another writer promotes between each read and write: the candidate never overwrites it."""
    cfg = _cfg(tmp_path)
    layout = StorageLayout(cfg.storage)
    _trained(layout, "prior-0", 0.5, "v1")
    promote(cfg, "prior")
    cand = _trained(layout, "prior-a", 0.6, "v2")
    judged = []

    def reevaluate(model, current, candidate):
        judged.append(current["run"])
        record, tag = registry.read_record(layout, "prior")
        assert registry.swap(layout, "prior", tag, {**record, "run": f"other-{len(judged)}"})
        return {"cos_pred_true": 0.5, **context("v2")}

    with pytest.raises(registry.RegistryBusy, match="changed 20 times while prior-a was judged"):
        promote(cfg, "prior", run=cand, reevaluate=reevaluate)
    assert judged == ["prior-0", *[f"other-{i}" for i in range(1, 20)]]
    assert promoted(cfg, "prior")["run"] == "other-20"


def test_a_held_lock_makes_a_swap_wait_and_a_stale_one_is_broken(tmp_path):
    layout = StorageLayout(str(tmp_path / "store"))
    lock = tmp_path / "store/registry/prior.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"holder": "elsewhere:1", "token": "t", "at": time.time()}))
    with pytest.raises(registry.RegistryBusy, match="held by elsewhere:1"):
        with registry.hold_lock(layout, "prior", timeout_s=0.2):
            pass
    assert lock.exists()  # not ours: left alone
    lock.write_text(json.dumps({"holder": "gone:2", "token": "t", "at": time.time() - 3600}))
    assert registry.swap(layout, "prior", "absent", {"run": "x"})
    assert registry.read_record(layout, "prior")[0] == {"run": "x"} and not lock.exists()
    assert not registry.swap(layout, "prior", "absent", {"run": "y"})  # the record changed
    assert registry.read_record(layout, "prior")[0] == {"run": "x"}
