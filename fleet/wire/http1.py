"""A small HTTP/1.1 client for the internal protocol: pooled keep-alive connections on asyncio
(one exchange on one connection: exchange.py), responses parsed by httptools.

Why not aiohttp: the engine protocol needs one thing from a client (send a small body, read the
response body as it arrives, close the connection to abort) and aiohttp's general request path
was a fifth to a quarter of the gateway's CPU per request, plus ~0.23 s of import on the
gateway's loop right after it starts listening. This module does that one thing: a request is a
pre-built head plus the body in one write; the response's status and body pieces go straight
from the parser's callbacks to the caller; the connection goes back to the pool once the response
has ended, or is closed if the caller leaves before that (which is how an engine request is
aborted).

Failures are built-in types: `ConnectionError` (refused, reset, closed early, not HTTP; its
subclasses `NotSent`, no connection was opened, and `Unanswered`, the connection ended before any
byte of the response), `TimeoutError` (no connection within `connect_timeout`, or no byte for
`read_timeout` during a response).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterable

from fleet.wire.exchange import HIGH_WATER, Connection, Response

__all__ = ["HIGH_WATER", "NotSent", "Pool", "Response", "Unanswered"]


class NotSent(ConnectionError):
    """No connection could be opened: no byte of the request left this process."""


class Unanswered(ConnectionError):
    """The connection ended (reset, closed) before any byte of the response arrived."""


class Pool:
    """Keep-alive connections to one server; `request` sends on an idle one or a new one."""

    def __init__(self, host: str, port: int, *, idle_limit: float, headers: Iterable[tuple[str, str]] = (),
                 connect_timeout: float = 5.0, read_timeout: float = 300.0, unix: str | None = None) -> None:
        """`idle_limit`: a connection idle this long is not reused; keep it below the server's
        keep-alive timeout, or a request sent into a connection closing just then is lost.
        `unix`: connect to the server's Unix socket at this path instead (to host and port while
        no file is there)."""
        self.host, self.port, self.unix = host, port, unix
        self.idle_limit = idle_limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        fixed = [("Host", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), *headers]
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed)
        self._idle: dict[Connection, None] = {}  # insertion-ordered: popitem() takes the newest
        self._busy: set[Connection] = set()
        self._heads: dict[tuple[str, str, str], bytes] = {}

    async def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> Response:
        """Send one request; return once the response's status line and headers arrived.

        A GET sent on a reused connection that closes before any byte of the response is sent
        again once, on a new connection (the server may have closed it as idle). A POST never is
        here; it fails with `Unanswered` then, and the caller decides (an engine sends its response
        head before it begins work, so a replica that answered nothing never started it).
        """
        data = self._head(method, path, content_type, len(body)) + body
        may_retry, fresh = method == "GET", False
        while True:
            conn = None if fresh else self._take()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            response = conn.send(data)
            try:
                while not response.status:
                    if response._error is not None:
                        raise response._error
                    await response._wait()
            except ConnectionError as e:
                conn.finish(abort=True)
                if may_retry and reused and conn.received == 0:
                    may_retry, fresh = False, True
                    continue
                if conn.received == 0 and not isinstance(e, NotSent):
                    raise Unanswered(str(e)) from e
                raise
            except BaseException:  # cancelled or timed out while waiting: leave the exchange
                conn.finish(abort=True)
                raise
            return response

    @property
    def idle(self) -> int:
        """Connections waiting in the pool for the next request."""
        return len(self._idle)

    async def close(self) -> None:
        """Close every connection, idle or busy."""
        for conn in [*self._idle, *self._busy]:
            conn.finish(abort=True)

    def _head(self, method: str, path: str, content_type: str, length: int) -> bytes:
        key = (method, path, content_type)
        prefix = self._heads.get(key)
        if prefix is None:
            ctype = f"Content-Type: {content_type}\r\n" if content_type else ""
            prefix = self._heads[key] = f"{method} {path} HTTP/1.1\r\n{self._fixed}{ctype}".encode("latin-1")
        return prefix + (b"Content-Length: %d\r\n\r\n" % length if length or method == "POST" else b"\r\n")

    def _take(self) -> Connection | None:
        now = time.monotonic()
        while self._idle:
            conn, _ = self._idle.popitem()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > self.idle_limit or not _established(conn.transport):
                conn.finish(abort=True)
                continue
            self._busy.add(conn)
            return conn
        return None

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:  # not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the connection opens
            async with asyncio.timeout(self.connect_timeout):
                conn: Connection | None = None
                if self.unix is not None:
                    # its file gone (a cleaner of temporary files took it): the server's port still answers
                    with contextlib.suppress(FileNotFoundError):
                        _, conn = await loop.create_unix_connection(lambda: Connection(self), self.unix)
                if conn is None:
                    _, conn = await loop.create_connection(lambda: Connection(self), self.host, self.port)
        except TimeoutError:
            raise NotSent(f"no connection within {self.connect_timeout:.0f}s") from None
        except OSError as e:  # refused, unreachable: the request's bytes went nowhere
            raise NotSent(str(e)) from e
        self._busy.add(conn)
        return conn

    def put_back(self, conn: Connection) -> None:
        self._busy.discard(conn)
        self._idle[conn] = None

    def forget(self, conn: Connection) -> None:
        self._busy.discard(conn)
        self._idle.pop(conn, None)


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info
_HUNG_UP = select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _established(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel still holds an idle connection as open both ways. A server process that
    died closed its end at once (FIN or RST is already queued here) even when this loop has not read
    that yet; a POST written to such a connection would fail after it left, and could never be sent
    elsewhere, while a fresh connection is refused before any byte leaves (NotSent). One getsockopt
    (TCP), or one poll (a Unix socket: an idle connection with anything to read, its end included,
    is not one to reuse)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    try:
        if sock.family == socket.AF_UNIX:
            poll = select.poll()
            poll.register(sock.fileno(), _HUNG_UP)
            return not poll.poll(0)
        if not hasattr(socket, "TCP_INFO"):
            return True
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED)
    except OSError:
        return False

