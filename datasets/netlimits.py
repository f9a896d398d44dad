"""One wall-clock deadline per request, from DNS to the last byte; a byte limit on the body.

:class:`LimitedHTTPConnection` / :class:`LimitedHTTPSConnection` resolve the host in a helper
thread that the request waits on only until its deadline, connect to the addresses the caller's
``resolve`` returned (never re-resolving the name), and hand every response a socket reader
whose each ``recv`` has its timeout shrunk to what is left of the deadline. The status line,
every header, every ``100 Continue`` and the body all go through that reader, so a server that
drips any part of a response ends the request within ``max_time_s``.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_CHUNK = 1 << 16
# (host, port or None, deadline) → addrinfo
Resolver = Callable[[str, int | None, float], list[tuple[Any, ...]]]


class LimitExceeded(OSError):
    """A request went over :class:`RequestLimits` (too many bytes or too much time)."""


@dataclass(frozen=True)
class RequestLimits:
    """Per-request bounds (``IngestConfig.max_redirects`` / ``max_image_bytes`` / ``max_request_time_s``)."""

    max_redirects: int = 5
    max_bytes: int = 32 * 1024 * 1024
    max_time_s: float = 60.0

    def too_slow(self) -> LimitExceeded:
        """The error of a request past its deadline."""
        return LimitExceeded(f"request took longer than max_request_time_s={self.max_time_s:g}")

    def too_big(self, n: int) -> LimitExceeded:
        """The error of a body over ``max_bytes``."""
        return LimitExceeded(
            f"response larger than max_image_bytes={self.max_bytes} ({n} bytes or more)"
        )


def getaddrinfo_within(host: str, port: int | None, deadline: float, limits: RequestLimits) -> list:
    """``socket.getaddrinfo`` that gives up at ``deadline`` (a resolver can stall for minutes)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as e:  # handed to the waiting request
            box["error"] = e

    t = threading.Thread(target=work, name=f"resolve-{host}", daemon=True)
    t.start()
    t.join(max(deadline - time.monotonic(), 0.0))
    if t.is_alive():
        raise LimitExceeded(f"{limits.too_slow()} (resolving {host})")
    if "error" in box:
        raise box["error"]
    return box["infos"]


def connect_within(
    address: tuple[str, int],
    timeout: float | None,
    deadline: float,
    limits: RequestLimits,
    resolve: Resolver,
) -> socket.socket:
    """Connect to the first reachable address ``resolve`` allowed, each try within the deadline."""
    host, port = address
    last: OSError | None = None
    for family, type_, proto, _, sockaddr in resolve(host, port, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise limits.too_slow()
        sock = socket.socket(family, type_, proto)
        try:
            sock.settimeout(left if timeout is None else min(timeout, left))
            sock.connect(sockaddr)  # the checked address itself, never the name again
            return sock
        except OSError as e:
            last = e
            sock.close()
    if time.monotonic() >= deadline:
        raise limits.too_slow()
    raise last or OSError(f"cannot connect to {host}:{port}")


class _DeadlineReader(io.RawIOBase):
    """The socket's bytes; each read waits at most until the request's deadline."""

    def __init__(
        self, sock: socket.socket, deadline: float, op_timeout: float | None, limits: RequestLimits
    ) -> None:
        super().__init__()
        self._raw = sock.makefile("rb", buffering=0)  # holds the socket open, as http.client's
        self._sock = sock
        self._deadline = deadline
        self._op_timeout = op_timeout
        self._limits = limits

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._limits.too_slow()
        timeout = left if self._op_timeout is None else min(self._op_timeout, left)
        with contextlib.suppress(OSError):
            self._sock.settimeout(max(timeout, 0.001))
        try:
            return self._raw.readinto(b)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise self._limits.too_slow() from None
            raise

    def close(self) -> None:
        self._raw.close()
        super().close()


class LimitedResponse(http.client.HTTPResponse):
    """An HTTPResponse read through a :class:`_DeadlineReader`, its body capped at ``max_bytes``."""

    def __init__(
        self, sock: socket.socket, *args: Any, limits: RequestLimits, deadline: float, **kw: Any
    ) -> None:
        super().__init__(sock, *args, **kw)
        plain = self.fp
        self.fp = io.BufferedReader(_DeadlineReader(sock, deadline, sock.gettimeout(), limits))
        plain.close()
        self._limits = limits
        self._received = 0

    def read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
        if self.length is not None and self.length > self._limits.max_bytes:
            raise self._limits.too_big(self.length)
        want = None if amt is None or amt < 0 else amt
        parts: list[bytes] = []
        while want is None or want > 0:
            b = super().read(_CHUNK if want is None else min(_CHUNK, want))
            if not b:
                break
            self._received += len(b)
            if self._received > self._limits.max_bytes:
                self.close()
                raise self._limits.too_big(self._received)
            parts.append(b)
            if want is not None:
                want -= len(b)
        return b"".join(parts)


class _LimitedMixin:
    """Connects through ``resolve`` within the deadline; responses read against it too."""

    def __init__(
        self, *args: Any, limits: RequestLimits, deadline: float, resolve: Resolver, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)  # the http.client connection class after this mixin
        self._setup_limits(limits, deadline, resolve)

    def _setup_limits(self, limits: RequestLimits, deadline: float, resolve: Resolver) -> None:
        timeout = self.timeout  # type: ignore[has-type]
        op_timeout = timeout if isinstance(timeout, (int, float)) else None
        self.timeout = max(deadline - time.monotonic(), 0.001)
        if op_timeout is not None:
            self.timeout = min(self.timeout, op_timeout)

        def create(address: tuple[str, int], *_: Any, **__: Any) -> socket.socket:
            return connect_within(address, op_timeout, deadline, limits, resolve)

        self._create_connection = create
        self.response_class = _response_class(limits, deadline)


def _response_class(limits: RequestLimits, deadline: float) -> Callable[..., LimitedResponse]:
    def make(sock: socket.socket, *args: Any, **kw: Any) -> LimitedResponse:
        return LimitedResponse(sock, *args, limits=limits, deadline=deadline, **kw)

    return make


class LimitedHTTPConnection(_LimitedMixin, http.client.HTTPConnection):
    """HTTPConnection bounded by one request deadline (see the module docstring)."""


class LimitedHTTPSConnection(_LimitedMixin, http.client.HTTPSConnection):
    """HTTPSConnection bounded by one request deadline; TLS still verifies the URL's host name."""
