"""Network safety for downloads: refuse internal hosts; bound redirects, bytes and time per request.

A downloader inside a cluster is an SSRF risk. :func:`build_opener` returns a urllib opener that
(1) speaks only http and https (no ``file://``, ``ftp://``, ``data:``), (2) unless private
networks are allowed, resolves each host once, refuses it if any address is not public (or
in ``allowed_networks``), and connects to the checked address itself, so neither a redirect nor
a DNS answer that changes between check and connect reaches an internal host, (3) never reads
proxies from the environment: a proxy is used only when configured (``NetPolicy.proxy``), and
then each target host is checked before the request is sent to it, and (4) enforces
:class:`RequestLimits` (``netlimits.py``): ``max_redirects`` hops, ``max_bytes`` of body and one
wall-clock deadline from DNS to the last byte, redirects included.

img2dataset opens URLs with ``urllib.request.urlopen``, the process-wide opener. The shard's
download runs in a child process of its own (``shard_child.py``), which calls
:func:`install_for_process` once at start: every download thread of that process, including a
retry that outlives the shard try, goes through the guard until the process ends. Nothing ever
puts the default opener back.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from .netlimits import (
    LimitedHTTPConnection,
    LimitedHTTPSConnection,
    LimitExceeded,
    RequestLimits,
    getaddrinfo_within,
)

__all__ = [
    "LimitExceeded",
    "NetPolicy",
    "RefusedAddress",
    "RequestLimits",
    "build_opener",
    "install_for_process",
    "refusal_reason",
]


class RefusedAddress(OSError):
    """A URL resolved to an address downloads may not reach."""


@dataclass(frozen=True)
class NetPolicy:
    """Where downloads may connect (``IngestConfig.allow_private_networks`` / ``allowed_networks`` / ``proxy``)."""

    allow_private_networks: bool = False
    allowed_networks: tuple[str, ...] = ()  # CIDRs reachable even though not public
    proxy: str | None = None  # http://host:port for http and https; None: direct

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """``allowed_networks`` parsed."""
        return [ipaddress.ip_network(n, strict=False) for n in self.allowed_networks]


# The deadline of the request this thread is opening; redirects (nested opens) inherit it.
_request = threading.local()
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo client, NAT64), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return None


def refusal_reason(ip: str, allowed: tuple[str, ...] = ()) -> str | None:
    """Why ``ip`` may not be downloaded from, or None if it is public or in ``allowed``."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if any(addr in net for net in NetPolicy(allowed_networks=allowed).networks()):
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:
            return "site-local address"
        inner = _embedded_ipv4(addr)
        if inner is not None:
            reason = refusal_reason(str(inner), allowed)
            return f"{reason} inside {addr}" if reason else None
    for name in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(addr, f"is_{name}"):
            return f"{name.replace('_', '-')} address"
    if not addr.is_global:
        return "non-global address"
    return None


def _resolver(policy: NetPolicy, limits: RequestLimits):  # noqa: ANN202
    """(host, port, deadline) → addrinfo, every answer checked unless private networks are allowed."""

    def resolve(host: str, port: int | None, deadline: float) -> list[tuple[Any, ...]]:
        infos = getaddrinfo_within(host, port, deadline, limits)
        if not policy.allow_private_networks:
            for info in infos:
                ip = info[4][0]
                reason = refusal_reason(ip, policy.allowed_networks)
                if reason:
                    raise RefusedAddress(
                        f"refused: {host} resolves to {ip}, a {reason} "
                        "(ingest.allow_private_networks is false)"
                    )
        return infos

    return resolve


class _Handlers:
    """http and https handlers whose connections are limited and (for targets) checked."""

    def __init__(self, policy: NetPolicy, limits: RequestLimits) -> None:
        self.policy, self.limits = policy, limits
        self.checked = _resolver(policy, limits)
        self.any_address = _resolver(NetPolicy(allow_private_networks=True), limits)

    def connection(self, cls: type, req: urllib.request.Request):  # noqa: ANN201
        """A connection factory for ``req``: to the proxy unchecked (configured), else checked."""
        # These handlers are reached only through _Opener.open, which set this thread's deadline.
        deadline: float = _request.deadline
        resolve = self.checked
        if self.policy.proxy:
            target = urllib.parse.urlsplit(req.full_url)
            try:  # the target, before anything is sent to the proxy; its addresses, not a port
                self.checked(target.hostname or "", target.port, deadline)
            except OSError as e:
                raise urllib.error.URLError(e) from None
            resolve = self.any_address

        def make(host: str, **kw: Any) -> Any:
            return cls(host, limits=self.limits, deadline=deadline, resolve=resolve, **kw)

        return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, handlers: _Handlers) -> None:
        super().__init__()
        self._h = handlers

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._h.connection(LimitedHTTPConnection, req), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, handlers: _Handlers) -> None:
        super().__init__()
        self._h = handlers

    def https_open(self, req: urllib.request.Request) -> Any:
        conn = self._h.connection(LimitedHTTPSConnection, req)
        return self.do_open(conn, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    """Counts every hop (urllib counts distinct URLs) and fails with a one-line reason."""

    def __init__(self, max_redirects: int) -> None:
        super().__init__()
        self.max_redirects = max_redirects
        self.max_redirections = self.max_repeats = max_redirects + 1  # ours fires first

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        hops = getattr(req, "_unclip_redirects", 0)
        if hops >= self.max_redirects:
            raise urllib.error.HTTPError(
                req.full_url,
                code,
                f"too many redirects (max_redirects={self.max_redirects})",
                headers,
                fp,
            )
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new._unclip_redirects = hops + 1
        return new


class _Opener(urllib.request.OpenerDirector):
    """Starts the deadline when a request is opened; redirects opened inside it share it."""

    def __init__(self, limits: RequestLimits) -> None:
        super().__init__()
        self._limits = limits

    def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):  # noqa: ANN001
        outer = getattr(_request, "deadline", None) is None
        if outer:
            _request.deadline = time.monotonic() + self._limits.max_time_s
        try:
            return super().open(fullurl, data, timeout)
        finally:
            if outer:
                _request.deadline = None


def build_opener(
    policy: NetPolicy | None = None, limits: RequestLimits | None = None
) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, within ``limits``, connecting only where ``policy`` allows."""
    policy = policy or NetPolicy()
    limits = limits or RequestLimits()
    handlers = _Handlers(policy, limits)
    opener = _Opener(limits)
    chain: list[urllib.request.BaseHandler] = [
        urllib.request.UnknownHandler(),  # any other scheme: "unknown url type"
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(limits.max_redirects),
        urllib.request.HTTPErrorProcessor(),
        _HTTPHandler(handlers),
        _HTTPSHandler(handlers),
    ]
    if policy.proxy:  # only the configured proxy; the environment's are never read
        chain.append(urllib.request.ProxyHandler({"http": policy.proxy, "https": policy.proxy}))
    for h in chain:
        opener.add_handler(h)
    return opener


_installed: tuple[NetPolicy, RequestLimits] | None = None


def install_for_process(policy: NetPolicy, limits: RequestLimits) -> None:
    """Make the guarded opener what ``urllib.request.urlopen`` uses for the rest of this process.

    Meant for a process that exists only to download (one shard try); installing a different
    policy later in the same process is refused, so no thread ever sees a weaker opener.
    """
    global _installed
    if _installed is not None and _installed != (policy, limits):
        raise RuntimeError("a different network guard is already installed in this process")
    urllib.request.install_opener(build_opener(policy, limits))
    _installed = (policy, limits)
