"""benchmarks/sampling.py at a tiny size: both paths run the demo's models and the table prints."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_sampling_benchmark_times_both_paths(capsys):
    spec = importlib.util.spec_from_file_location(
        "sampling_bench", REPO / "benchmarks" / "sampling.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--n", "2", "--steps", "2", "--repeat", "1"])
    assert torch.is_grad_enabled()  # it runs in this process: the tests after it still train
    assert result["images"] == 2 and result["steps"] == 2
    assert result["pipeline_s"] > 0 and result["bare_s"] > 0
    assert result["ratio"] == pytest.approx(result["bare_s"] / result["pipeline_s"], rel=0.05)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[2].startswith("| UnclipPipeline |") and json.loads(lines[-1]) == result
