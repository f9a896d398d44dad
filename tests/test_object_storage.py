"""The storage root on S3: ingest → embed → manifest → prior steps against an S3 API on loopback.

The endpoint reaches s3fs the way a user gives it: the standard ``AWS_ENDPOINT_URL`` (with the
usual ``AWS_*`` credentials) that botocore reads, set before Ray starts, so every Ray worker
(ingest tasks, the embedding, the Train workers) writes through the same endpoint.
"""

from __future__ import annotations

import json

import dagster as dg
import pytest
import ray
import s3fs
from shrunk_config import TINY_TRAINER, write_shrunk_config

from unclip.pipelines.config import load_config
from unclip.pipelines.runner import run_pipeline

ONE_WORKER = {**TINY_TRAINER, "num_workers": 1, "zero_stage": 1, "max_steps": 3}
TINY_S3_RUN = {
    "synthetic": {"num_pairs": 40},
    "ingest": {"samples_per_shard": 20, "thread_count": 4},
    "bootstrap": {"trainer": {**ONE_WORKER, "batch_size": 8}},
    "prior": {"trainer": {**ONE_WORKER, "batch_size": 8}},
    "ray": {"num_cpus": 2},
}
# The prior and what it is trained from: URL lists → shards → CLIP → embeddings → manifest.
PRIOR_AND_UPSTREAM = dg.AssetSelection.assets("prior").upstream()


@pytest.fixture
def ray_after_the_endpoint(s3_root):
    """No Ray yet: the run starts its own after ``s3_root`` set the endpoint, so workers inherit it."""
    if ray.is_initialized():
        ray.shutdown()
    yield s3_root
    ray.shutdown()


@pytest.mark.e2e
def test_the_pipeline_runs_on_an_s3_storage_root(ray_after_the_endpoint, tmp_path, monkeypatch):
    root = f"{ray_after_the_endpoint}/unclip"
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    config = write_shrunk_config(tmp_path / "s3.yaml", root, TINY_S3_RUN)
    cfg = load_config(config)

    run = run_pipeline(str(config), cfg, select=PRIOR_AND_UPSTREAM)
    assert run.success, run

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # a client of its own: what is really there
    bucket = root.removeprefix("s3://")
    tars = fs.glob(f"{bucket}/images/*/*.tar")
    assert len(tars) == 2, tars
    assert all(fs.size(t) > 0 for t in tars)
    embeddings = fs.glob(f"{bucket}/embeddings/*/*/*.parquet")
    assert len(embeddings) == 2, embeddings
    version = json.loads(fs.cat(f"{bucket}/manifests/latest.json"))["version"]
    manifest = json.loads(fs.cat(f"{bucket}/manifests/{version}.json"))
    assert manifest["num_samples"] == run.outputs["dataset_manifest"].num_samples > 30
    assert run.outputs["dataset_manifest"].version == version
    assert fs.exists(f"{bucket}/manifests/{version}.stats.npz")
    (prior_run,) = [p for p in fs.ls(f"{bucket}/runs/prior") if fs.isdir(p)]
    assert fs.glob(f"{prior_run}/checkpoint_*"), "no Ray Train checkpoint on S3"
    lines = fs.cat(f"{prior_run}/metrics.jsonl").decode().splitlines()
    assert [json.loads(ln)["step"] for ln in lines if "loss" in json.loads(ln)][-1] == 3
    assert fs.ls(f"{prior_run}/export")
    # nothing went to a local folder named like the root instead
    assert not list(tmp_path.glob("**/images")) and not list(tmp_path.glob("**/manifests"))
    # no temporary of an atomic write was left behind under a final name's folder
    assert not [p for p in fs.find(bucket) if ".tmp-" in p]
