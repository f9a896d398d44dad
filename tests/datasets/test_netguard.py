"""Network safety: private, loopback, link-local and metadata addresses are refused."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from unclip.datasets.config import SyntheticConfig
from unclip.datasets.netguard import (
    RequestLimits,
    build_opener,
    guarded_urlopen,
    refusal_reason,
)
from unclip.datasets.synthetic import serve_synthetic


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.5",
        "172.16.9.9",
        "169.254.169.254",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "100.64.0.1",
    ],
)
def test_non_public_addresses_are_refused(ip):
    assert refusal_reason(ip) is not None


@pytest.mark.parametrize("ip", ["8.8.8.8", "151.101.1.69", "2606:4700:4700::1111"])
def test_public_addresses_pass(ip):
    assert refusal_reason(ip) is None


def test_guarded_opener_refuses_loopback_and_allows_it_when_asked():
    cfg = SyntheticConfig(num_pairs=2, image_size=16)
    with serve_synthetic(cfg) as base:
        with pytest.raises(urllib.error.URLError, match="refused: 127.0.0.1"):
            build_opener(False).open(f"{base}/0.png", timeout=5)
        with pytest.raises(urllib.error.URLError, match="refused: localhost"):
            build_opener(False).open(f"{base.replace('127.0.0.1', 'localhost')}/0.png", timeout=5)
        with build_opener(True).open(f"{base}/0.png", timeout=5) as r:
            assert r.status == 200
        with guarded_urlopen(False), pytest.raises(urllib.error.URLError, match="refused"):
            urllib.request.urlopen(f"{base}/0.png", timeout=5)
        with urllib.request.urlopen(f"{base}/0.png", timeout=5) as r:  # restored afterwards
            assert r.status == 200


@pytest.mark.parametrize("allow", [False, True])
def test_only_http_schemes(tmp_path, allow):
    f = tmp_path / "secret.txt"
    f.write_text("x")
    with pytest.raises(urllib.error.URLError, match="unknown url type"):
        build_opener(allow).open(f.as_uri())


# --- request limits: redirects, bytes, time (served by conftest's BadServer) ---------------


def _read(url: str, **limits) -> bytes:
    with build_opener(True, RequestLimits(**limits)).open(url, timeout=10) as r:
        return r.read()


@pytest.mark.parametrize(
    ("path", "limits", "message"),
    [
        ("/stall.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/drip.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/endless.png", {"max_bytes": 300_000}, "larger than max_image_bytes=300000"),
        ("/big.png", {"max_bytes": 1000}, "larger than max_image_bytes=1000"),
        ("/loop.png", {"max_redirects": 3}, "too many redirects (max_redirects=3)"),
        ("/hops/3.png", {"max_redirects": 2}, "too many redirects (max_redirects=2)"),
    ],
)
def test_limits_end_bad_responses_in_time(bad_server, path, limits, message):
    base, _ = bad_server
    start = time.monotonic()
    with pytest.raises(OSError) as e:
        _read(base + path, **limits)
    assert message in str(e.value)
    assert time.monotonic() - start < 3.0


def test_limits_pass_good_responses(bad_server):
    base, state = bad_server
    assert _read(f"{base}/hops/2.png", max_redirects=2).startswith(b"\x89PNG")
    assert _read(f"{base}/big.png", max_bytes=10_000_000) == state.static["/big.png"][1]
    with pytest.raises(urllib.error.URLError, match="refused: 169.254.169.254"):
        build_opener(False).open("http://169.254.169.254/latest/meta-data/", timeout=5)
