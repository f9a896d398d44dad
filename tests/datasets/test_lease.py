"""Writer leases: one live holder per name, on a local disk, in memory and on S3 (moto, loopback)."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from unclip.datasets.lease import Lease, LeaseHeld, LeaseLost


@pytest.fixture(params=["local", "memory", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://lease-{uuid.uuid4().hex[:8]}"
    return request.getfixturevalue("s3_root")


def test_a_second_writer_stops_with_a_message_naming_the_holder(root):
    first = Lease(f"{root}/_leases/writer", what="unclip run a.yaml").acquire()
    with pytest.raises(LeaseHeld, match=r"held by unclip run a.yaml \(holder .*pid \d+"):
        Lease(f"{root}/_leases/writer", what="unclip run b.yaml").acquire(wait_s=0)
    assert Lease.current(f"{root}/_leases/writer").what == "unclip run a.yaml"
    first.release()
    second = Lease(f"{root}/_leases/writer", what="unclip run b.yaml").acquire(wait_s=0)
    assert Lease.current(f"{root}/_leases/writer").holder == second.holder
    second.release()
    assert Lease.current(f"{root}/_leases/writer") is None


def test_of_many_concurrent_contenders_exactly_one_wins(root):
    uri = f"{root}/_leases/shard"
    leases = [Lease(uri, what=f"try {i}") for i in range(6)]
    barrier = threading.Barrier(len(leases))
    won: list[Lease] = []

    def contend(lease: Lease) -> None:
        barrier.wait()
        if lease.try_acquire() is None:
            won.append(lease)

    threads = [threading.Thread(target=contend, args=(le,)) for le in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1
    assert Lease.current(uri).holder == won[0].holder


def test_a_waiting_writer_gets_the_lease_when_the_holder_releases_it(tmp_path):
    uri = str(tmp_path / "lease")
    first = Lease(uri, what="first").acquire()
    threading.Timer(0.5, first.release).start()
    start = time.monotonic()
    second = Lease(uri, what="second").acquire(wait_s=10, poll_s=0.1)
    assert 0.4 < time.monotonic() - start < 5
    second.release()


def test_an_expired_holder_is_taken_over_and_may_not_commit(tmp_path):
    uri = str(tmp_path / "lease")
    stale = Lease(uri, what="killed writer", ttl_s=0.3).acquire()  # never renewed
    with pytest.raises(LeaseHeld):
        Lease(uri, what="next").acquire(wait_s=0)
    time.sleep(0.4)
    taker = Lease(uri, what="next").acquire(wait_s=0)
    with pytest.raises(LeaseLost):
        stale.ensure()
    taker.ensure()
    taker.release()


def test_the_heartbeat_keeps_a_short_lease_alive_while_it_is_held(tmp_path):
    uri = str(tmp_path / "lease")
    with Lease(uri, what="long job", ttl_s=0.6).hold() as lease:
        time.sleep(1.5)  # past two TTLs: only renewals keep it
        with pytest.raises(LeaseHeld, match="long job"):
            Lease(uri).acquire(wait_s=0)
        lease.ensure()
    assert Lease.current(uri) is None


def test_a_killed_holder_on_this_host_frees_the_lease_at_once(tmp_path):
    import subprocess
    import sys

    uri = str(tmp_path / "_leases" / "writer")
    code = (
        "from unclip.datasets.lease import Lease; import os; "
        f"Lease({uri!r}, what='a run killed later', ttl_s=600).acquire(); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)  # exits without releasing
    assert Lease.current(uri) is None  # its process is gone, though the TTL has not run out
    Lease(uri, what="the rerun").acquire(wait_s=0).release()
    alive = Lease(uri, what="this process", ttl_s=600).acquire()
    assert Lease.current(uri).holder == alive.holder  # a live process keeps it
    alive.release()
