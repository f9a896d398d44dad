"""The promotion gate: a trained checkpoint replaces the promoted one only if it evaluates better.

``decide`` is the rule, a pure function, and ``context_of`` says which evaluations it may
compare: two sets of numbers are comparable only when they come from the same dataset version,
hold-out split, CLIP and protocol. ``promote`` applies the rule to a model's candidate run. The
promoted model's own numbers are used when their context is the candidate's; otherwise the
promoted model is evaluated again on the candidate's evaluation (``reevaluate``, written under
``eval/{candidate}/against/{promoted}/``), and when that cannot be done the comparison is
refused with the reason. ``registry/{model}.json`` (export, metrics, dataset version, the run's
own config) changes only by a compare-and-swap (``registry.swap``), so of two promotions running
at once the better candidate stays. Every decision is written next to the candidate's
evaluation as ``eval/{run}/promotion.json``; rejections and refusals are also appended to
``registry/{model}.rejected.jsonl``. A rejected candidate's run and report stay where they are.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets.storage import StorageLayout, atomic_write, exists, read_json, write_json
from unclip.pipelines import registry
from unclip.pipelines.config import PipelineConfig, PromotionMetric
from unclip.training.engine.fit_result import EXPORT_MARKER  # the run's own identity

EVAL_METRICS_FILES = {
    "prior": "prior_metrics.json",
    "decoder": "decoder_metrics.json",
    "upsampler": "upsampler_metrics.json",
}
SWAP_TRIES = 20

# What an evaluation's numbers depend on besides the model under test.
PRIOR_CONTEXT = (
    "data_version",
    "split",
    "holdout_fraction",
    "clip_id",
    "num_pairs",
    "sample_steps",
    "guidance_scale",
    "candidates",
)
CASCADE_CONTEXT = ("data_version", "holdout_fraction", "num_samples", "settings")
# The run under test is not context: the decoder's own run, or the upsampler's (in the cascade).
NOT_CONTEXT = {"decoder": ("decoder_run",), "upsampler": ("cascade",)}


@dataclass
class Decision:
    """Whether a candidate is promoted, and the comparison per metric that says why."""

    promote: bool
    status: str  # "first" | "promoted" | "rejected" | "refused" | "current"
    reasons: list[str] = field(default_factory=list)


class NotComparable(ValueError):
    """The promoted model cannot be evaluated the way the candidate was: the reason is the text."""


# (model, promoted record, candidate record with "metrics") → the promoted model's metrics in
# the candidate's context, or NotComparable.
Reevaluate = Callable[[str, dict[str, Any], dict[str, Any]], dict[str, Any]]


def decide(
    gates: list[PromotionMetric],
    candidate: dict[str, Any],
    promoted: dict[str, Any] | None,
) -> Decision:
    """Promote when no metric is worse than the promoted one's beyond its tolerance and at
    least one is strictly better; the first candidate with every metric present is promoted.

    ``candidate`` / ``promoted`` map metric names to values, measured in one context;
    ``promoted`` is None when nothing is promoted yet. A metric the candidate lacks (or that is
    NaN) rejects it; one the promoted model lacks refuses the comparison (it is no win).
    """
    missing = [g.metric for g in gates if not _finite(candidate.get(g.metric))]
    if missing:
        return Decision(
            False, "rejected", [f"candidate has no finite value for {m!r}" for m in missing]
        )
    if promoted is None:
        return Decision(True, "first", ["no promoted checkpoint yet"])
    unknown = [g.metric for g in gates if not _finite(promoted.get(g.metric))]
    if unknown:
        return Decision(
            False,
            "refused",
            [
                f"the promoted checkpoint has no finite value for {m!r}: no comparison"
                for m in unknown
            ],
        )
    reasons: list[str] = []
    worse, better = [], []
    for g in gates:
        new, old = float(candidate[g.metric]), float(promoted[g.metric])
        gain = new - old if g.mode == "max" else old - new
        text = f"{g.metric} ({g.mode}): {new:.4g} vs promoted {old:.4g}, tolerance {g.tolerance:g}"
        if gain < -g.tolerance:
            worse.append(g.metric)
            reasons.append(f"{text}: worse")
        elif gain > 0:
            better.append(g.metric)
            reasons.append(f"{text}: better")
        else:
            reasons.append(f"{text}: within tolerance")
    if worse:
        return Decision(False, "rejected", reasons)
    if not better:
        return Decision(False, "rejected", [*reasons, "no metric improved"])
    return Decision(True, "promoted", reasons)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def context_of(model: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The part of an evaluation that must be equal for two models' metrics to be compared."""
    keys = PRIOR_CONTEXT if model == "prior" else CASCADE_CONTEXT
    out = {k: metrics.get(k) for k in keys}
    if isinstance(out.get("settings"), dict):
        drop = NOT_CONTEXT.get(model, ())
        out["settings"] = {k: v for k, v in out["settings"].items() if k not in drop}
    return out


def context_diff(model: str, a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """``key: a vs b`` for each context key where two evaluations differ (empty: comparable)."""
    ca, cb = context_of(model, a), context_of(model, b)
    return [f"{k}: {ca[k]!r} vs {cb[k]!r}" for k in ca if ca[k] != cb[k]]


class MissingMetrics(FileNotFoundError):
    """The candidate's evaluation wrote no metrics file: it cannot be compared."""


def against_metrics(
    layout: StorageLayout, model: str, candidate_run: str, promoted_run: str
) -> str:
    """Where the promoted model's metrics, measured in the candidate's context, are kept."""
    return layout.join("eval", candidate_run, "against", promoted_run, EVAL_METRICS_FILES[model])


def candidate_of(
    cfg: PipelineConfig, model: str, run: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run record (default: ``runs/{model}/latest.json``) with its eval metrics."""
    layout = StorageLayout(cfg.storage)
    if run is None:
        latest = layout.latest_run(model)
        if not exists(latest):
            raise FileNotFoundError(f"no trained {model} ({latest} is missing): train it first")
        run = read_json(latest)
    metrics_path = layout.join("eval", run["run"], EVAL_METRICS_FILES[model])
    if not exists(metrics_path):
        raise MissingMetrics(
            f"{model} run {run['run']}: {metrics_path} is missing, so it cannot be compared "
            "with the promoted checkpoint; materialize `evaluation` first"
        )
    return {**run, "metrics": read_json(metrics_path), "metrics_file": metrics_path}


def run_config(model: str, export: str) -> dict[str, Any]:
    """The model section and trainer the run was trained with, from its export's ``fit.json``."""
    marker = f"{export.rstrip('/')}/{EXPORT_MARKER}"
    if not exists(marker):
        raise NotComparable(f"{marker} is missing: the export is not a finished training run")
    fit = read_json(marker)
    task = fit.get("task") or {}
    return {
        **(task.get(model) or {}),
        "trainer": fit.get("trainer"),
        "data_version": task.get("data_version"),
        "holdout_fraction": task.get("holdout_fraction"),
    }


def baseline_metrics(
    layout: StorageLayout,
    model: str,
    current: dict[str, Any],
    cand: dict[str, Any],
    reevaluate: Reevaluate | None,
) -> dict[str, Any]:
    """The promoted model's metrics in the candidate's context, or NotComparable saying why not."""
    diff = context_diff(model, current["metrics"], cand["metrics"])
    if not diff:
        return current["metrics"]
    path = against_metrics(layout, model, cand["run"], current["run"])
    if exists(path) and not context_diff(model, read_json(path), cand["metrics"]):
        return read_json(path)
    where = (
        f"the promoted run {current['run']} was evaluated in another context ({'; '.join(diff)})"
    )
    if reevaluate is None:
        raise NotComparable(f"{where} and there is no re-evaluation to put it in the candidate's")
    metrics = reevaluate(model, current, cand)
    left = context_diff(model, metrics, cand["metrics"])
    if left:
        raise NotComparable(f"{where}; its re-evaluation still differs: {'; '.join(left)}")
    write_json(path, metrics)
    return metrics


def judge_candidate(
    layout: StorageLayout,
    model: str,
    gates: list[PromotionMetric],
    cand: dict[str, Any],
    current: dict[str, Any] | None,
    reevaluate: Reevaluate | None = None,
) -> tuple[Decision, dict[str, Any] | None]:
    """The decision on ``cand`` against ``current``, and the promoted metrics it compared with."""
    if current is not None and current.get("run") == cand["run"]:
        return Decision(False, "current", ["this run is the promoted checkpoint"]), None
    alone = decide(gates, cand["metrics"], None)
    if current is None or not alone.promote:
        return alone, None
    try:
        base = baseline_metrics(layout, model, current, cand, reevaluate)
    except NotComparable as e:
        return Decision(False, "refused", [str(e)]), None
    return decide(gates, cand["metrics"], base), base


def promote(
    cfg: PipelineConfig,
    model: str,
    run: dict[str, Any] | None = None,
    reevaluate: Reevaluate | None = None,
) -> dict[str, Any]:
    """Apply the gate to ``run`` (default: ``model``'s latest run); swap the registry when it wins.

    When another promotion swaps the registry between this one's read and its write, the
    candidate is judged again against the newly promoted checkpoint.
    """
    layout = StorageLayout(cfg.storage)
    gates = cfg.promotion.models.get(model, [])
    failed: Decision | None = None
    try:
        cand = candidate_of(cfg, model, run)
    except MissingMetrics as e:
        cand = {**(run or read_json(layout.latest_run(model))), "metrics": {}}
        failed = Decision(False, "rejected", [str(e)])
    for _ in range(SWAP_TRIES):
        current, tag = registry.read_record(layout, model)
        decision, base = (
            (failed, None)
            if failed
            else judge_candidate(layout, model, gates, cand, current, reevaluate)
        )
        config: dict[str, Any] = {}
        if decision.promote:
            try:
                config = run_config(model, cand["export"])
            except NotComparable as e:
                decision = Decision(False, "refused", [str(e)])
        report = {
            "model": model,
            "run": cand["run"],
            "export": cand["export"],
            "dataset_version": cand.get("dataset_version"),
            "metrics": cand["metrics"],
            "gates": [g.model_dump() for g in gates],
            "against": {"run": current["run"], "metrics": base} if current else None,
            **asdict(decision),
        }
        if decision.status != "current":
            write_json(layout.join("eval", cand["run"], "promotion.json"), report)
        out = {"model": model, "run": cand["run"], **asdict(decision)}
        if not decision.promote:
            if decision.status in ("rejected", "refused"):
                _record_rejection(layout, model, report)
            return out
        record = {
            "model": model,
            "run": cand["run"],
            "export": cand["export"],
            "dataset_version": cand.get("dataset_version"),
            "metrics": cand["metrics"],
            "config": config,
            "promoted_at": time.time(),
            "previous": current["run"] if current else None,
        }
        if registry.swap(layout, model, tag, record):
            return out
    raise registry.RegistryBusy(
        f"{layout.registry(model)} changed {SWAP_TRIES} times while {cand['run']} was judged"
    )


def _record_rejection(layout: StorageLayout, model: str, report: dict[str, Any]) -> None:
    """Append to ``registry/{model}.rejected.jsonl`` once per (candidate, promoted) pair."""
    path = layout.join("registry", f"{model}.rejected.jsonl")
    with registry.hold_lock(layout, f"{model}.rejected"):
        lines: list[str] = []
        if exists(path):
            fs, p = url_to_fs(path)
            with fs.open(p, "r") as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip()]
        against = (report.get("against") or {}).get("run")
        for ln in lines:
            old = json.loads(ln)
            if old.get("run") == report["run"] and old.get("against") == against:
                return
        entry = {
            "run": report["run"],
            "against": against,
            "status": report["status"],
            "reasons": report["reasons"],
            "metrics": {k: v for k, v in report["metrics"].items() if _finite(v)},
            "at": time.time(),
        }
        with atomic_write(path, "w") as f:
            f.write("\n".join([*lines, json.dumps(entry, sort_keys=True)]) + "\n")


def promoted(cfg: PipelineConfig, model: str) -> dict[str, Any] | None:
    """The registry record of ``model``, or None."""
    return registry.read_record(StorageLayout(cfg.storage), model)[0]
