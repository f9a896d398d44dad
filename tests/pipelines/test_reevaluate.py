"""The promoted prior put through a candidate's evaluation on a newer data version, for real."""

from __future__ import annotations

import shutil

import torch
from training_helpers import (
    CLIP_ID,
    DIM,
    HOLDOUT,
    SOURCE,
    build_embedded_store,
    make_prior_task,
)

from unclip.datasets.config import ManifestConfig
from unclip.datasets.manifest import assemble_manifest
from unclip.datasets.storage import StorageLayout, read_json, write_json
from unclip.pipelines.config import parse_config
from unclip.pipelines.promotion import against_metrics, promote, promoted
from unclip.pipelines.reevaluate import reevaluator
from unclip.training.engine.fit_result import FitResult
from unclip.training.evaluation.prior_eval import evaluate_prior


def _finished_run(layout: StorageLayout, run: str, version: str, source: str | None = None) -> dict:
    """An exported prior with the trainer's marker: a copy of ``source``, else a fresh one."""
    export = layout.join("runs", "prior", run, "export")
    task = make_prior_task(dim=DIM, clip_id=CLIP_ID)
    if source is None:
        torch.manual_seed(0)
        task.export(task.build_model(), export)
    else:
        shutil.copytree(source, export)
    marker = {"run_name": run, "task": task.describe(), "trainer": {}, "metrics": {}}
    write_json(f"{export}/fit.json", marker)
    return {"run": run, "export": export, "dataset_version": version}


def test_a_promoted_prior_is_reevaluated_on_the_candidates_holdout(tmp_path):
    store = build_embedded_store(str(tmp_path / "store"))
    layout, v1 = store.layout, store.version
    cfg = parse_config(
        {
            "storage": layout.root,
            "prior": {"sample_steps": 4},
            "evaluate": {"holdout_fraction": HOLDOUT},
        }
    )

    def evaluated(rec: dict, max_pairs: int = 1000) -> dict:
        fit = FitResult(rec["run"], "", rec["export"])
        ev = cfg.evaluate.model_copy(update={"max_pairs": max_pairs})
        return evaluate_prior(layout, rec["dataset_version"], fit, ev, HOLDOUT, prior_cfg=cfg.prior)

    a = _finished_run(layout, "prior-a", v1)
    evaluated(a)
    assert promote(cfg, "prior", run=a)["status"] == "first"

    # A refreshed data version (a CLIP-score filter keeps the cleanest 30 %), and a candidate
    # with exactly the promoted weights: it must not win by the data alone.
    v2 = assemble_manifest(layout, CLIP_ID, [SOURCE], ManifestConfig(clip_score_top_fraction=0.3))[
        "version"
    ]
    b = _finished_run(layout, "prior-b", v2, source=a["export"])
    on_v2 = evaluated(b, max_pairs=5)  # the protocol of the candidate's evaluation, not ours
    stored = promoted(cfg, "prior")["metrics"]
    # What the old rule saw: a gain past the gate's tolerance (0.005), twice over.
    assert on_v2["cos_pred_true"] > stored["cos_pred_true"] + 0.01
    out = promote(cfg, "prior", run=b, reevaluate=reevaluator(cfg))
    assert out["status"] == "rejected" and out["reasons"][-1] == "no metric improved"
    again = read_json(against_metrics(layout, "prior", "prior-b", "prior-a"))
    assert again["data_version"] == v2 and again["split"] == "holdout"
    assert again["cos_pred_true"] == on_v2["cos_pred_true"]
    assert again["num_pairs"] == on_v2["num_pairs"] < stored["num_pairs"]
    assert promoted(cfg, "prior")["run"] == "prior-a"

    # A promoted prior of another CLIP's space cannot be judged on this data: refused.
    c = _finished_run(layout, "prior-c", v1, source=a["export"])
    info = read_json(f"{a['export']}/unclip_prior.json")
    write_json(f"{a['export']}/unclip_prior.json", {**info, "clip_id": "otherclip0000000"})
    evaluated(c)
    write_json(
        layout.registry("prior"),
        {**promoted(cfg, "prior"), "metrics": {**stored, "data_version": "v0"}},
    )
    out = promote(cfg, "prior", run=c, reevaluate=reevaluator(cfg))
    assert out["status"] == "refused"
    assert "CLIP otherclip0000000" in out["reasons"][0] and f"CLIP {CLIP_ID}" in out["reasons"][0]


def test_what_cannot_be_reevaluated_is_refused_with_its_reason(tmp_path):
    import pytest

    from unclip.pipelines.promotion import NotComparable
    from unclip.pipelines.reevaluate import promoted_on_candidate

    store = build_embedded_store(str(tmp_path / "store"))
    layout = store.layout
    cfg = parse_config({"storage": layout.root, "evaluate": {"holdout_fraction": HOLDOUT}})
    export = layout.join("runs", "decoder", "decoder-a", "export")
    promoted_rec = {"run": "decoder-a", "export": export}
    metrics = {"data_version": store.version, "holdout_fraction": HOLDOUT, "settings": {}}
    cand = {"run": "decoder-b", "metrics": metrics}
    with pytest.raises(NotComparable, match="upsampler is not re-evaluated"):
        promoted_on_candidate(cfg, "upsampler", promoted_rec, cand)
    with pytest.raises(NotComparable, match="unclip_decoder.json: it cannot be re-evaluated"):
        promoted_on_candidate(cfg, "decoder", promoted_rec, cand)
    write_json(f"{export}/unclip_decoder.json", {"clip_id": CLIP_ID})
    later = {**metrics, "settings": {"cascade": {"upsampler_exports": "['…']"}}}
    with pytest.raises(NotComparable, match="cascade has later stages"):
        promoted_on_candidate(cfg, "decoder", promoted_rec, {**cand, "metrics": later})
    with pytest.raises(NotComparable, match="do not say which hold-out split"):
        promoted_on_candidate(
            cfg, "decoder", promoted_rec, {**cand, "metrics": {**metrics, "holdout_fraction": None}}
        )
