"""Network safety: private, loopback, link-local and metadata addresses are refused."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from unclip.datasets.config import IngestConfig, SyntheticConfig
from unclip.datasets.netguard import NetPolicy, RequestLimits, build_opener, refusal_reason
from unclip.datasets.shard_child import net_policy
from unclip.datasets.synthetic import serve_synthetic

GUARD = NetPolicy()
OPEN = NetPolicy(allow_private_networks=True)


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
        "fec0::1",  # site-local
        "2002:7f00:1::1",  # 6to4 around 127.0.0.1
        "2002:a00:1::1",  # 6to4 around 10.0.0.1
        "64:ff9b::a00:1",  # NAT64 around 10.0.0.1
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo around 10.0.0.1
    ],
)
def test_non_public_addresses_are_refused(ip):
    assert refusal_reason(ip) is not None


@pytest.mark.parametrize(
    "ip", ["8.8.8.8", "151.101.1.69", "2606:4700:4700::1111", "2002:808:808::1"]
)
def test_public_addresses_pass(ip):
    assert refusal_reason(ip) is None


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("127.0.0.1", "loopback address"),
        ("::1", "loopback address"),
        ("169.254.169.254", "link-local address"),
        ("fe80::1%eth0", "link-local address"),  # a zone as getaddrinfo writes it
        ("10.1.2.3", "private address"),
        ("224.0.0.1", "multicast address"),  # ipaddress calls multicast "global"
        ("ff02::1", "multicast address"),
        ("100.64.0.1", "non-global address"),
        ("::ffff:127.0.0.1", "loopback address inside ::ffff:7f00:1"),
        ("64:ff9b::c0a8:1", "private address inside 64:ff9b::c0a8:1"),  # NAT64, 192.168.0.1
    ],
)
def test_a_refusal_names_what_kind_of_address_it_is(ip, reason):
    assert refusal_reason(ip) == reason


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [
        ("fe80::1%eth0", "fe80::/10"),
        ("::ffff:10.0.0.1", "10.0.0.1/32"),
        ("64:ff9b::a00:1", "10.0.0.1/32"),  # NAT64 reaches exactly 10.0.0.1
        ("10.0.0.1", "10.9.9.9/8"),  # host bits in the CIDR are ignored, as the config's check does
    ],
)
def test_allowed_networks_cover_zones_embeddings_and_loose_cidrs(ip, allowed):
    assert refusal_reason(ip, (allowed,)) is None
    assert refusal_reason(ip) is not None


def test_nat64_to_a_public_address_passes():
    assert refusal_reason("64:ff9b::808:808") is None  # 8.8.8.8


def test_guarded_opener_refuses_loopback_and_allows_it_when_asked():
    cfg = SyntheticConfig(num_pairs=2, image_size=16)
    with serve_synthetic(cfg) as base:
        with pytest.raises(urllib.error.URLError, match="refused: 127.0.0.1"):
            build_opener(GUARD).open(f"{base}/0.png", timeout=5)
        with pytest.raises(urllib.error.URLError, match="refused: localhost"):
            build_opener(GUARD).open(f"{base.replace('127.0.0.1', 'localhost')}/0.png", timeout=5)
        with build_opener(OPEN).open(f"{base}/0.png", timeout=5) as r:
            assert r.status == 200
        allowed = NetPolicy(allowed_networks=("127.0.0.0/8",))
        with build_opener(allowed).open(f"{base}/0.png", timeout=5) as r:
            assert r.status == 200
        loose = net_policy(IngestConfig(allowed_networks=["127.9.9.9/8"]))  # the config accepts it
        with build_opener(loose).open(f"{base}/0.png", timeout=5) as r:
            assert r.status == 200


def test_a_policy_cannot_be_weakened_after_its_opener_is_built():
    policy = NetPolicy()
    opener = build_opener(policy)
    with pytest.raises(AttributeError):
        policy.allow_private_networks = True  # type: ignore[misc]
    with _serve("127.0.0.1") as (port, hits):
        with pytest.raises(urllib.error.URLError, match="refused: 127.0.0.1"):
            opener.open(f"http://127.0.0.1:{port}/secret", timeout=5)
    assert sum(hits.values()) == 0


@pytest.mark.parametrize("allow", [False, True])
def test_only_http_schemes(tmp_path, allow):
    f = tmp_path / "secret.txt"
    f.write_text("x")
    with pytest.raises(urllib.error.URLError, match="unknown url type"):
        build_opener(NetPolicy(allow_private_networks=allow)).open(f.as_uri())


# --- request limits: redirects, bytes, time (served by conftest's BadServer) ---------------


def _read(url: str, **limits) -> bytes:
    with build_opener(OPEN, RequestLimits(**limits)).open(url, timeout=10) as r:
        return r.read()


@pytest.mark.parametrize(
    ("path", "limits", "message"),
    [
        ("/stall.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/drip.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/slow-headers.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/continue.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/slow-status.png", {"max_time_s": 1.0}, "longer than max_request_time_s=1"),
        ("/endless.png", {"max_bytes": 300_000}, "larger than max_image_bytes=300000"),
        ("/big.png", {"max_bytes": 1000}, "larger than max_image_bytes=1000"),
        ("/loop.png", {"max_redirects": 3}, "too many redirects (max_redirects=3)"),
        ("/hops/3.png", {"max_redirects": 2}, "too many redirects (max_redirects=2)"),
    ],
)
@pytest.mark.timeout(30)
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
    assert _read(f"{base}/hops/2.png", max_time_s=1.0).startswith(b"\x89PNG")
    assert _read(f"{base}/big.png", max_bytes=10_000_000) == state.static["/big.png"][1]
    with pytest.raises(urllib.error.URLError, match="refused: 169.254.169.254"):
        build_opener(GUARD).open("http://169.254.169.254/latest/meta-data/", timeout=5)


# --- who the guard lets through: DNS rebinding, mixed answers, redirects, TLS, proxies -------
# 127.0.0.2 stands for a public host (``allowed_networks``), 127.0.0.1 for an internal one;
# host names are answered by a stub resolver, so no test leaves loopback.

PUBLIC = NetPolicy(allowed_networks=("127.0.0.2/32",))


@contextlib.contextmanager
def _serve(host: str, port: int = 0, tls: ssl.SSLContext | None = None, delay_s: float = 0.0):
    """A server on ``host`` counting hits per path; ``/to/...`` redirects to the rest of the path.

    Each response waits ``delay_s`` before its status line.
    """
    hits: Counter[str] = Counter()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            hits[self.path] += 1
            time.sleep(delay_s)
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", self.path[len("/to/") :])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = f"from {host}".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def fake_dns(monkeypatch):
    """Stub answers per host name: a list of successive answers (the last one repeats)."""
    real = socket.getaddrinfo
    answers: dict[str, list] = {}

    def fake(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        seq = answers[host]
        ips = seq.pop(0) if len(seq) > 1 else seq[0]
        if callable(ips):
            ips = ips()
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return answers


@pytest.fixture
def two_hosts():
    """(port, public hits, internal hits): the same port on 127.0.0.2 and 127.0.0.1."""
    with _serve("127.0.0.1") as (port, internal), _serve("127.0.0.2", port) as (_, public):
        yield port, public, internal


def test_dns_rebinding_between_check_and_connect_never_reaches_the_internal_host(
    fake_dns, two_hosts
):
    port, public, internal = two_hosts
    fake_dns["rebind.test"] = [["127.0.0.2"], ["127.0.0.1"]]  # checked: public; asked again: not
    with build_opener(PUBLIC).open(f"http://rebind.test:{port}/x", timeout=5) as r:
        assert r.read() == b"from 127.0.0.2"
    assert (public["/x"], internal["/x"]) == (1, 0)


def test_a_host_with_public_and_private_answers_is_refused(fake_dns, two_hosts):
    port, public, internal = two_hosts
    fake_dns["mixed.test"] = [["127.0.0.2", "127.0.0.1"]]
    with pytest.raises(urllib.error.URLError, match="refused: mixed.test resolves to 127.0.0.1"):
        build_opener(PUBLIC).open(f"http://mixed.test:{port}/x", timeout=5)
    assert sum(public.values()) + sum(internal.values()) == 0


def test_a_redirect_from_a_public_host_to_a_private_one_is_refused(fake_dns, two_hosts):
    port, public, internal = two_hosts
    fake_dns["public.test"] = [["127.0.0.2"]]
    url = f"http://public.test:{port}/to/http://127.0.0.1:{port}/secret"
    with pytest.raises(urllib.error.URLError, match="refused: 127.0.0.1"):
        build_opener(PUBLIC).open(url, timeout=5)
    assert public[f"/to/http://127.0.0.1:{port}/secret"] == 1 and internal["/secret"] == 0


def _self_signed(tmp_path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "public.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("public.test")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_https_goes_through_the_guard_and_still_verifies_the_host_name(
    fake_dns, tmp_path, monkeypatch
):
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # the client trusts the test certificate
    fake_dns["public.test"] = [["127.0.0.2"]]
    fake_dns["internal.test"] = [["127.0.0.1"]]
    fake_dns["other.test"] = [["127.0.0.2"]]
    with _serve("127.0.0.1", tls=tls) as (port, internal):
        with _serve("127.0.0.2", port, tls=tls) as (_, public):
            with build_opener(PUBLIC).open(f"https://public.test:{port}/x", timeout=5) as r:
                assert r.read() == b"from 127.0.0.2"
            with pytest.raises(urllib.error.URLError, match="refused: internal.test"):
                build_opener(PUBLIC).open(f"https://internal.test:{port}/x", timeout=5)
            with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED|match"):
                build_opener(PUBLIC).open(f"https://other.test:{port}/x", timeout=5)
    assert public["/x"] == 1 and sum(internal.values()) == 0


def test_a_stalled_resolver_ends_the_request_at_its_deadline(fake_dns):
    fake_dns["slow.test"] = [lambda: time.sleep(6) or ["127.0.0.2"]]
    start = time.monotonic()
    with pytest.raises(urllib.error.URLError, match="longer than max_request_time_s=0.5"):
        build_opener(PUBLIC, RequestLimits(max_time_s=0.5)).open("http://slow.test:9/x")
    assert time.monotonic() - start < 3.0  # the resolver's 6 s; room for a loaded machine


def _chain(hops: int) -> str:
    """A path that ``_serve`` redirects ``hops`` times before answering ``/x``."""
    return "/to/" * hops + "/x"


@pytest.mark.timeout(30)
def test_one_deadline_covers_the_request_and_all_its_redirects():
    # Every response waits 0.4 s, so a chain of 10 redirects takes 4.4 s and each hop alone
    # fits well within a 1 s deadline: only a deadline shared by all hops ends it.
    limits = RequestLimits(max_time_s=1.0, max_redirects=20)
    roomy = RequestLimits(max_time_s=30.0, max_redirects=20)
    with _serve("127.0.0.1", delay_s=0.4) as (port, hits):
        with build_opener(OPEN, roomy).open(f"http://127.0.0.1:{port}{_chain(1)}") as r:
            assert r.read() == b"from 127.0.0.1"  # the chain itself is answered
        first = sum(hits.values())
        start = time.monotonic()
        with pytest.raises(OSError, match="longer than max_request_time_s=1"):
            build_opener(OPEN, limits).open(f"http://127.0.0.1:{port}{_chain(10)}")
        elapsed = time.monotonic() - start
    assert elapsed < 3.0, elapsed  # not the chain's 4.4 s; room for a loaded machine
    assert first == 2 and sum(hits.values()) - first <= 4  # 1 s holds three 0.4 s hops
    assert hits["/x"] == 1  # only the first request got to the end of its chain


def test_environment_proxies_are_ignored_and_a_configured_one_is_checked(
    fake_dns, two_hosts, monkeypatch
):
    port, public, internal = two_hosts
    fake_dns["public.test"] = [["127.0.0.2"]]
    fake_dns["internal.test"] = [["127.0.0.1"]]
    with _serve("127.0.0.1") as (proxy_port, proxied):
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy_port}")
        monkeypatch.delenv("no_proxy", raising=False)
        with build_opener(PUBLIC).open(f"http://public.test:{port}/direct", timeout=5) as r:
            assert r.read() == b"from 127.0.0.2"
        assert public["/direct"] == 1 and sum(proxied.values()) == 0
        via = NetPolicy(
            allowed_networks=PUBLIC.allowed_networks, proxy=f"http://127.0.0.1:{proxy_port}"
        )
        with build_opener(via).open(f"http://public.test:{port}/p", timeout=5) as r:
            assert r.read() == b"from 127.0.0.1"  # the proxy answered
        assert proxied[f"http://public.test:{port}/p"] == 1
        with pytest.raises(urllib.error.URLError, match="refused: internal.test"):
            build_opener(via).open(f"http://internal.test:{port}/secret", timeout=5)
        for url in ("http://localhost/secret", "https://localhost/secret"):  # no port: real DNS
            with pytest.raises(urllib.error.URLError, match="refused: localhost resolves to"):
                build_opener(via).open(url, timeout=5)
        assert sum(proxied.values()) == 1 and sum(internal.values()) == 0


def test_the_guard_installed_for_a_process_covers_threads_started_later():
    """A download thread that outlives the shard try still goes through the guard."""
    script = (
        "import sys, threading, urllib.request\n"
        "from unclip.datasets.netguard import NetPolicy, RequestLimits, install_for_process\n"
        "install_for_process(NetPolicy(), RequestLimits())\n"
        "out = []\n"
        "def later():\n"
        "    try:\n"
        "        urllib.request.urlopen(sys.argv[1], timeout=5); out.append('reached')\n"
        "    except Exception as e:\n"
        "        out.append('refused' if 'refused' in str(e) else str(e))\n"
        "t = threading.Thread(target=later); t.start(); t.join()\n"
        "install_for_process(NetPolicy(), RequestLimits())  # equal again: accepted\n"
        "try:\n"
        "    install_for_process(NetPolicy(allow_private_networks=True), RequestLimits())\n"
        "    out.append('weakened')\n"
        "except RuntimeError:\n"
        "    out.append('kept')\n"
        "print(out)\n"
    )
    with _serve("127.0.0.1") as (port, internal):
        done = subprocess.run(
            [sys.executable, "-c", script, f"http://127.0.0.1:{port}/secret"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.stdout.strip() == "['refused', 'kept']", done.stderr[-2000:]
    assert sum(internal.values()) == 0
