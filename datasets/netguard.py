"""Network safety for downloads: refuse internal hosts; bound redirects, bytes and time per request.

A downloader inside a cluster is an SSRF risk. img2dataset opens URLs with ``urllib.request.urlopen``,
which uses the process-wide opener; :func:`guarded_urlopen` installs, for the duration of a shard,
an opener that (1) speaks only http and https (no ``file://``, ``ftp://``, ``data:``), (2) unless
private networks are allowed, resolves each host with ``socket.getaddrinfo``, refuses it if any
address is not global, and connects to the checked address itself, so neither a redirect nor a
DNS answer that changes between check and connect can reach an internal host, and (3) enforces
:class:`RequestLimits`: at most ``max_redirects`` hops, at most ``max_bytes`` of body, and one
wall-clock deadline for the whole request (redirects and body included). The body is read one
``recv`` at a time with the socket timeout shrunk to what is left of the deadline, so a server
that stalls mid-body or streams forever ends the request within the limit.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class RefusedAddress(OSError):
    """A URL resolved to an address downloads may not reach."""


class LimitExceeded(OSError):
    """A response went over ``RequestLimits`` (too many bytes or too much time)."""


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds (see ``IngestConfig.max_redirects`` / ``max_image_bytes`` / ``max_request_time_s``)."""

    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    max_time_s: float = 60.0


_CHUNK = 1 << 16
# The deadline of the request this thread is opening; redirects (nested opens) inherit it.
_request = threading.local()


def refusal_reason(ip: str) -> str | None:
    """Why ``ip`` may not be downloaded from, or None if it is a public address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for name in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(addr, f"is_{name}"):
            return f"{name.replace('_', '-')} address"
    if not addr.is_global:
        return "non-global address"
    return None


def resolve_checked(host: str, port: int) -> list[tuple[Any, ...]]:
    """getaddrinfo for ``host``; raises RefusedAddress if any answer is not a public address."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for info in infos:
        ip = info[4][0]
        reason = refusal_reason(ip)
        if reason:
            raise RefusedAddress(
                f"refused: {host} resolves to {ip}, a {reason} (ingest.allow_private_networks is false)"
            )
    return infos


def _create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):  # noqa: B008
    host, port = address
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in resolve_checked(host, port):
        sock = socket.socket(family, type_, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            last = e
            sock.close()
    raise last or OSError(f"cannot connect to {host}:{port}")


class _LimitedResponse(http.client.HTTPResponse):
    """An HTTPResponse whose ``read`` enforces a byte limit and the request's deadline."""

    def __init__(
        self, sock: socket.socket, *args: Any, limits: RequestLimits, deadline: float, **kw: Any
    ):
        super().__init__(sock, *args, **kw)
        self._limit_sock = sock
        self._limits = limits
        self._deadline = deadline
        self._op_timeout = sock.gettimeout()
        self._received = 0

    def _too_slow(self) -> LimitExceeded:
        return LimitExceeded(
            f"request took longer than max_request_time_s={self._limits.max_time_s:g}"
        )

    def _too_big(self, n: int) -> LimitExceeded:
        return LimitExceeded(
            f"response larger than max_image_bytes={self._limits.max_bytes} ({n} bytes or more)"
        )

    def _arm(self) -> None:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._too_slow()
        timeout = left if self._op_timeout is None else min(self._op_timeout, left)
        with contextlib.suppress(OSError):
            self._limit_sock.settimeout(max(timeout, 0.001))

    def read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
        if self.length is not None and self.length > self._limits.max_bytes:
            raise self._too_big(self.length)
        want = None if amt is None or amt < 0 else amt
        parts: list[bytes] = []
        while want is None or want > 0:
            self._arm()
            try:
                b = super().read1(_CHUNK if want is None else min(_CHUNK, want))
            except TimeoutError:
                if time.monotonic() >= self._deadline:
                    raise self._too_slow() from None
                raise
            if not b:
                break
            self._received += len(b)
            if self._received > self._limits.max_bytes:
                self.close()
                raise self._too_big(self._received)
            parts.append(b)
            if want is not None:
                want -= len(b)
        return b"".join(parts)


class _LimitedConnectionMixin:
    """Connects through the address guard (if on) within the deadline; responses are limited."""

    def _setup_limits(self, limits: RequestLimits, guard: bool) -> None:
        deadline = getattr(_request, "deadline", None) or time.monotonic() + limits.max_time_s
        left = max(deadline - time.monotonic(), 0.001)
        timeout = self.timeout  # type: ignore[has-type]
        self.timeout = left if not isinstance(timeout, (int, float)) else min(timeout, left)
        if guard:
            self._create_connection = _create_connection
        self.response_class = functools.partial(_LimitedResponse, limits=limits, deadline=deadline)


class _LimitedHTTPConnection(_LimitedConnectionMixin, http.client.HTTPConnection):
    def __init__(self, *args: Any, limits: RequestLimits, guard: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_limits(limits, guard)


class _LimitedHTTPSConnection(_LimitedConnectionMixin, http.client.HTTPSConnection):
    def __init__(self, *args: Any, limits: RequestLimits, guard: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_limits(limits, guard)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, limits: RequestLimits, guard: bool) -> None:
        super().__init__()
        self._conn = functools.partial(_LimitedHTTPConnection, limits=limits, guard=guard)

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._conn, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, limits: RequestLimits, guard: bool) -> None:
        super().__init__()
        self._conn = functools.partial(_LimitedHTTPSConnection, limits=limits, guard=guard)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._conn, req, context=self._context)


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
    allow_private_networks: bool, limits: RequestLimits | None = None
) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, within ``limits``; with the guard on unless private networks are allowed."""
    limits = limits or RequestLimits()
    guard = not allow_private_networks
    opener = _Opener(limits)
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.UnknownHandler(),  # any other scheme: "unknown url type"
        urllib.request.HTTPDefaultErrorHandler(),
        _RedirectHandler(limits.max_redirects),
        urllib.request.HTTPErrorProcessor(),
        _HTTPHandler(limits, guard),
        _HTTPSHandler(limits, guard),
    ]
    for h in handlers:
        opener.add_handler(h)
    return opener


@contextlib.contextmanager
def guarded_urlopen(
    allow_private_networks: bool, limits: RequestLimits | None = None
) -> Iterator[None]:
    """Install the guarded opener process-wide for the block (one shard task per worker process)."""
    previous = urllib.request._opener  # what urlopen uses when none is installed: None
    urllib.request.install_opener(build_opener(allow_private_networks, limits))
    try:
        yield
    finally:
        urllib.request._opener = previous
