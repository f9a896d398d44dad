"""The promotion gate: a trained checkpoint replaces the promoted one only if it evaluates better.

``decide`` is the rule, a pure function. ``promote`` applies it to a model's latest run:
``registry/{model}.json`` names the promoted checkpoint (export, metrics, dataset version,
config); every decision, promoted or not, is written next to the candidate's evaluation as
``eval/{run}/promotion.json``, and rejections are also appended to
``registry/{model}.rejected.jsonl``. A rejected candidate's run and report stay where they are.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fsspec.core import url_to_fs

from unclip.datasets.storage import StorageLayout, atomic_write, exists, read_json, write_json
from unclip.pipelines.config import PipelineConfig, PromotionMetric

METRICS_FILE = {
    "prior": "prior_metrics.json",
    "decoder": "decoder_metrics.json",
    "upsampler": "upsampler_metrics.json",
}


@dataclass
class Decision:
    """Whether a candidate is promoted, and the comparison per metric that says why."""

    promote: bool
    status: str  # "first" | "promoted" | "rejected" | "current"
    reasons: list[str] = field(default_factory=list)


def decide(
    gates: list[PromotionMetric],
    candidate: dict[str, Any],
    promoted: dict[str, Any] | None,
) -> Decision:
    """Promote when no metric is worse than the promoted one's beyond its tolerance and at
    least one is strictly better; the first candidate with every metric present is promoted.

    ``candidate`` / ``promoted`` map metric names to values; ``promoted`` is None when nothing
    is promoted yet. A metric the candidate lacks (or that is NaN) rejects it.
    """
    reasons: list[str] = []
    missing = [g.metric for g in gates if not _finite(candidate.get(g.metric))]
    if missing:
        return Decision(
            False, "rejected", [f"candidate has no finite value for {m!r}" for m in missing]
        )
    if promoted is None:
        return Decision(True, "first", ["no promoted checkpoint yet"])
    worse, better = [], []
    for g in gates:
        new = float(candidate[g.metric])
        old = promoted.get(g.metric)
        if not _finite(old):
            reasons.append(f"{g.metric}: {new:.4g} (the promoted checkpoint has no value)")
            better.append(g.metric)
            continue
        old = float(old)
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


class MissingMetrics(FileNotFoundError):
    """The candidate's evaluation wrote no metrics file: it cannot be compared."""


def candidate_of(cfg: PipelineConfig, model: str) -> dict[str, Any]:
    """The latest run of ``model`` (``runs/{model}/latest.json``) with its eval metrics."""
    layout = StorageLayout(cfg.storage)
    latest = layout.latest_run(model)
    if not exists(latest):
        raise FileNotFoundError(f"no trained {model} ({latest} is missing): train it first")
    run = read_json(latest)
    metrics_path = layout.join("eval", run["run"], METRICS_FILE[model])
    if not exists(metrics_path):
        raise MissingMetrics(
            f"{model} run {run['run']}: {metrics_path} is missing, so it cannot be compared "
            "with the promoted checkpoint; materialize `evaluation` first"
        )
    return {**run, "metrics": read_json(metrics_path), "metrics_file": metrics_path}


def promote(cfg: PipelineConfig, model: str) -> dict[str, Any]:
    """Apply the gate to ``model``'s latest run; update the registry when it wins."""
    layout = StorageLayout(cfg.storage)
    gates = cfg.promotion.models.get(model, [])
    registry = layout.registry(model)
    current = read_json(registry) if exists(registry) else None
    decision: Decision | None = None
    try:
        cand = candidate_of(cfg, model)
    except MissingMetrics as e:
        cand = {**read_json(layout.latest_run(model)), "metrics": {}}
        decision = Decision(False, "rejected", [str(e)])
    if decision is None and current is not None and current.get("run") == cand["run"]:
        decision = Decision(False, "current", ["this run is the promoted checkpoint"])
    if decision is None:
        decision = decide(gates, cand["metrics"], current["metrics"] if current else None)
    report = {
        "model": model,
        "run": cand["run"],
        "export": cand["export"],
        "dataset_version": cand.get("dataset_version"),
        "metrics": cand["metrics"],
        "gates": [g.model_dump() for g in gates],
        "against": {"run": current["run"], "metrics": current["metrics"]} if current else None,
        **asdict(decision),
    }
    if decision.status != "current":
        write_json(layout.join("eval", cand["run"], "promotion.json"), report)
    if decision.promote:
        write_json(
            registry,
            {
                "model": model,
                "run": cand["run"],
                "export": cand["export"],
                "dataset_version": cand.get("dataset_version"),
                "metrics": cand["metrics"],
                "config": getattr(cfg, model).model_dump(mode="json"),
                "promoted_at": time.time(),
                "previous": current["run"] if current else None,
            },
        )
    elif decision.status == "rejected":
        _record_rejection(layout, model, report)
    return {"model": model, "run": cand["run"], **asdict(decision)}


def _record_rejection(layout: StorageLayout, model: str, report: dict[str, Any]) -> None:
    """Append to ``registry/{model}.rejected.jsonl`` once per (candidate, promoted) pair."""
    path = layout.join("registry", f"{model}.rejected.jsonl")
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
        "reasons": report["reasons"],
        "metrics": {k: v for k, v in report["metrics"].items() if _finite(v)},
        "at": time.time(),
    }
    with atomic_write(path, "w") as f:
        f.write("\n".join([*lines, json.dumps(entry, sort_keys=True)]) + "\n")


def promoted(cfg: PipelineConfig, model: str) -> dict[str, Any] | None:
    """The registry record of ``model``, or None."""
    path = StorageLayout(cfg.storage).registry(model)
    return read_json(path) if exists(path) else None
