"""Network safety: private, loopback, link-local and metadata addresses are refused."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from unclip.datasets.config import SyntheticConfig
from unclip.datasets.netguard import build_opener, guarded_urlopen, refusal_reason
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
