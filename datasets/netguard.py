"""Network safety for downloads: refuse URLs that reach loopback, private, link-local or metadata hosts.

A downloader inside a cluster is an SSRF risk. img2dataset opens URLs with ``urllib.request.urlopen``,
which uses the process-wide opener; :func:`guarded_urlopen` installs, for the duration of a shard,
an opener that (1) speaks only http and https (no ``file://``, ``ftp://``, ``data:``) and (2) unless
private networks are allowed, resolves each host with ``socket.getaddrinfo``, refuses it if any
address is not global, and connects to the checked address itself, so neither a redirect nor a
DNS answer that changes between check and connect can reach an internal host.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import urllib.request
from collections.abc import Iterator
from typing import Any


class RefusedAddress(OSError):
    """A URL resolved to an address downloads may not reach."""


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


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _create_connection


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_GuardedHTTPConnection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context)


def build_opener(allow_private_networks: bool) -> urllib.request.OpenerDirector:
    """An opener for http(s) only; with the guard on unless private networks are allowed."""
    opener = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.UnknownHandler(),  # any other scheme: "unknown url type"
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ]
    if allow_private_networks:
        handlers += [urllib.request.HTTPHandler(), urllib.request.HTTPSHandler()]
    else:
        handlers += [_GuardedHTTPHandler(), _GuardedHTTPSHandler()]
    for h in handlers:
        opener.add_handler(h)
    return opener


@contextlib.contextmanager
def guarded_urlopen(allow_private_networks: bool) -> Iterator[None]:
    """Install the guarded opener process-wide for the block (one shard task per worker process)."""
    previous = urllib.request._opener  # what urlopen uses when none is installed: None
    urllib.request.install_opener(build_opener(allow_private_networks))
    try:
        yield
    finally:
        urllib.request._opener = previous
