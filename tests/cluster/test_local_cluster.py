"""The shrunk pipeline on a local multi-process Ray cluster (cluster/local-cluster.sh), and
what survives a killed worker node or a killed driver.

One cluster for the module: a head and a worker node with 1 CPU and a small object store
each, so a 2-worker Ray Train run must use both nodes. Every driver is a real `unclip`
subprocess reaching the cluster through RAY_ADDRESS, as on a production cluster.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from local_cluster import LocalCluster, finish, free_port, unclip, wait_for
from shrunk_config import write_shrunk_config

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

TRAIN_WORKER = ":actor_name:RayTrainWorker"
SHARD_TASK = ":task_name:download_shard"


@pytest.fixture(scope="module")
def cluster():
    """A head + worker cluster on this machine, stopped (only its own processes) afterwards."""
    # Short path: Ray's socket paths live under the temp dir and must stay < 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="uc-", dir="/tmp"))
    c = LocalCluster(port=free_port(), dir=root)
    try:
        c.sh("start")
        yield c
    finally:
        try:
            c.sh("stop", timeout=60)
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def shared():
    """What one test leaves for a later one (the pipeline's storage root)."""
    return {}


def _mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.glob(pattern)}


def _check_shards(images: Path) -> int:
    """Every committed tar opens and holds exactly the samples its stats and Parquet report."""
    total = 0
    for tar_path in sorted(images.glob("*.tar")):
        shard = tar_path.stem
        with tarfile.open(tar_path) as tar:
            keys = {Path(m.name).stem for m in tar.getmembers() if m.name.endswith(".jpg")}
            for m in tar.getmembers():
                assert tar.extractfile(m).read() is not None, f"{tar_path}: {m.name}"
        stats = json.loads((images / f"{shard}_stats.json").read_text())
        rows = pq.read_table(images / f"{shard}.parquet").to_pylist()
        ok = {r["key"] for r in rows if r["status"] == "success"}
        assert len(keys) == stats["successes"] == len(ok), shard
        assert keys == ok, shard
        total += len(keys)
    return total


PLACEMENT = """
import json, ray
ray.init(log_to_driver=False, logging_level="ERROR")  # RAY_ADDRESS from the environment

@ray.remote(num_cpus=1)
def where():
    return ray.get_runtime_context().get_node_id()

print(json.dumps({
    "head": ray.get(where.options(resources={"unclip_head": 1}).remote(), timeout=120),
    "worker": ray.get(where.options(resources={"unclip_worker": 1}).remote(), timeout=120),
    "cpus": ray.cluster_resources()["CPU"],
}))
"""


def test_nodes_have_their_own_resources(cluster):
    """Two alive nodes, each with 1 CPU and its own custom resource that pins work to it."""
    nodes = cluster.node_ids()
    assert set(nodes) == {"head", "worker"} and nodes["head"] != nodes["worker"]
    done = subprocess.run(
        [sys.executable, "-c", PLACEMENT],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    placed = json.loads(done.stdout.strip().splitlines()[-1])
    assert placed == {**nodes, "cpus": 2.0}


def test_ingest_survives_a_killed_worker_node(cluster, tmp_path):
    """Kill the worker node mid-ingest: its shards are retried on the head, none is corrupt."""
    config = write_shrunk_config(
        tmp_path / "cfg.yaml",
        tmp_path / "store",
        {"synthetic": {"num_pairs": 160}, "ingest": {"samples_per_shard": 20, "thread_count": 2}},
    )
    log = tmp_path / "ingest.log"
    worker_tasks_before = cluster.worker_logs("worker").count(SHARD_TASK)
    proc = unclip(cluster, tmp_path, "ingest", str(config), log=log)
    store = tmp_path / "store"
    try:
        # Kill once the worker node has started a shard and at least one shard is committed.
        wait_for(
            "a shard task on the worker node",
            lambda: cluster.worker_logs("worker").count(SHARD_TASK) > worker_tasks_before,
            proc,
            timeout=240,
        )
        cluster.sh("kill-worker")
        killed_at = len(list(store.glob("images/*/*.tar")))
        finish(proc, log, timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.sh("start-worker")
    assert killed_at < 8, "the worker died after ingest had already finished"
    images = next(p for p in (store / "images").iterdir() if not p.name.startswith("_"))
    assert len(list(images.glob("*.tar"))) == 8
    # A try killed mid-write may leave a ``*.tmp-*`` sibling; it is never listed as a shard.
    assert _check_shards(images) == 160
    summary = json.loads((images / "_ingest_stats.json").read_text())
    assert summary["failed_shards"] == {} and summary["successes"] == 160


def test_pipeline_spreads_training_and_a_killed_driver_redoes_nothing(cluster, tmp_path, shared):
    """`unclip run` on the cluster: SIGKILL the driver after ingest, re-run, finish.

    Ingest is not redone (tars untouched); training ran on both nodes.
    """
    store = tmp_path / "store"
    # no upsampler: a fourth training run would show nothing the other three do not
    config = write_shrunk_config(tmp_path / "cfg.yaml", store, {"upsampler": None})
    shared["store"], shared["config"], shared["cwd"] = store, config, tmp_path
    log = tmp_path / "run.log"
    proc = unclip(cluster, tmp_path, "run", str(config), log=log)
    try:
        # The ingest stage is done once the bootstrap CLIP's run folder appears.
        wait_for("the stage after ingest", lambda: (store / "runs" / "clip").is_dir(), proc, 420)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    shards = _mtimes(store, "images/*/0*")
    assert len([s for s in shards if s.endswith(".tar")]) == 3

    rerun_log = tmp_path / "rerun.log"
    proc = unclip(cluster, tmp_path, "run", str(config), log=rerun_log)
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Checked before the run's own outcome: what the killed driver finished stays done.
    assert _mtimes(store, "images/*/0*") == shards, "ingest redid committed shards"
    # Ray Train's workers ran on both nodes (each node's own worker logs name the actor).
    assert TRAIN_WORKER in cluster.worker_logs("head")
    assert TRAIN_WORKER in cluster.worker_logs("worker")
    finish(proc, rerun_log, timeout=1)
    for model in ("clip", "prior", "decoder"):
        runs = [p for p in (store / "runs" / model).iterdir() if p.is_dir()]
        assert len(runs) == 1, runs
        assert (runs[0] / "export").is_dir(), model
    assert list(store.glob("eval/**/*.json")), "no evaluation written"


def test_training_resumes_after_a_killed_worker_node(cluster, shared):
    """Kill the worker node mid-training: Ray Train restarts from the last checkpoint."""
    store = shared.get("store")
    if store is None or not list(store.glob("manifests/*.json")):
        pytest.skip("needs the data set the pipeline test assembles")
    config, cwd = shared["config"], shared["cwd"]
    before = {p.name for p in (store / "runs" / "prior").iterdir()}
    sets = {
        "prior.trainer.max_steps": 60,  # identity key: a new run, trained from scratch
        "prior.trainer.checkpoint_every": 10,
        "prior.trainer.log_every": 1,
        "prior.trainer.max_failures": 2,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    log = cwd / "train.log"
    workers_before = _train_workers(cluster)
    proc = unclip(cluster, cwd, "train", "prior", str(config), *args, log=log)
    restart = None
    try:

        def run_dir() -> Path | None:
            runs = [p for p in (store / "runs" / "prior").iterdir() if p.name not in before]
            return next((p for p in runs if p.is_dir()), None)

        def rows() -> list[dict]:
            path = (run_dir() or store) / "metrics.jsonl"
            if not path.exists():
                return []
            return [json.loads(line) for line in path.read_text().splitlines() if line]

        def registered() -> bool:
            # Ray Train resumes from what its controller registered, which it records here
            # (a checkpoint folder alone may not be registered yet).
            snapshot = (run_dir() or store) / "checkpoint_manager_snapshot.json"
            return snapshot.exists() and "checkpoint_000000010" in snapshot.read_text()

        wait_for("the checkpoint of step 10", registered, proc, timeout=360)
        cluster.sh("kill-worker")
        saved = [r for r in rows() if r["step"] <= 10]
        # Bring the node back while Ray Train waits for room for its 2 workers.
        restart = threading.Thread(target=cluster.sh, args=("start-worker",))
        restart.start()
        finish(proc, log, timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
        if restart is not None:
            restart.join()
    run = run_dir()
    after = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == list(range(1, 61))
    # Resumed, not restarted: the rows up to the checkpoint (their measured samples_per_s
    # included) are the ones written before the kill, not recomputed.
    assert len(saved) == 10 and after[:10] == saved
    # Ray Train started a second worker group after the node died.
    assert _train_workers(cluster) - workers_before >= 4
    assert (run / "export").is_dir()


def _train_workers(cluster: LocalCluster) -> int:
    return sum(cluster.worker_logs(node).count(TRAIN_WORKER) for node in ("head", "worker"))
