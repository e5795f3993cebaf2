"""A small HTTP/1.1 client for the internal protocol: pooled keep-alive connections on asyncio,
responses parsed by httptools (the C parser uvicorn uses).

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
import socket
import time
from collections.abc import Iterable

import httptools

# Body bytes held for a caller that has not read them yet, beyond which the socket is not read
# (TCP pushes back on the server) until the caller catches up: a slow SSE client must not make
# the gateway buffer a whole long answer.
HIGH_WATER = 256 * 1024




class NotSent(ConnectionError):
    """No connection could be opened: no byte of the request left this process."""


class Unanswered(ConnectionError):
    """The connection ended (reset, closed) before any byte of the response arrived."""

class Response:
    """One response as it arrives: `status` once `Pool.request` returns, the body by `read()`."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_ended", "_error", "_waiter", "status")

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The body bytes received since the last call, waiting for some; b"" once the body ended."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            await self._wait()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered >= HIGH_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    async def body(self) -> bytes:
        """The whole (rest of the) body."""
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the response: its connection goes back to the pool once the response ends."""
        if self._conn.response is self:  # not once the connection serves another request
            self._conn.finish(abort=False)

    def abort(self) -> None:
        """Leave now: close the connection (the server sees the client go)."""
        if self._conn.response is self:
            self._conn.finish(abort=True)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if not self._ended and self._error is None:
            self._error = error
            self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time; httptools calls the on_* methods."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.received = 0  # bytes of the current response; a reused connection may retry at 0
        self._released = False  # the caller is done; back to the pool when the response ends
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- one exchange ---------------------------------------------------------------------------

    def send(self, data: bytes) -> Response:
        """Start a request (`data`: head and body); its Response fills in as bytes arrive."""
        assert self.transport is not None and self.response is None
        self.response = Response(self)
        if self.closed or self.transport.is_closing():
            # lost between connecting and now (a server dying as it accepted): nothing will come
            self.response._fail(ConnectionError("connection closed before the request was sent"))
            return self.response
        self.received, self._released = 0, False
        self._last_data = time.monotonic()
        self._arm(self.pool.read_timeout)
        self.transport.write(data)
        return self.response

    def finish(self, *, abort: bool) -> None:
        """The caller is done with the current response: recycle the connection, or close it."""
        if abort or self.closed:
            self._close()
        elif self.response is not None and self.response._ended:
            self._recycle()
        else:
            self._released = True  # the rest of the body (e.g. the last chunk's end) is on its way

    def resume(self) -> None:
        """Read the socket again (after the caller took what was buffered)."""
        if self.transport is not None and not self.closed and not self.transport.is_reading():
            self.transport.resume_reading()

    def _recycle(self) -> None:
        self._disarm()
        self.resume()
        self.response, self._released = None, False
        self.idle_since = time.monotonic()
        self.pool._put(self)

    def _close(self, error: BaseException | None = None) -> None:
        self._disarm()
        if self.response is not None:
            self.response._fail(error or ConnectionError("connection closed"))
            self.response = None
        self.closed = True
        self.pool._forget(self)
        if self.transport is not None:
            self.transport.close()

    # --- the silence timer: one per exchange, moved on lazily rather than per read --------------

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_silence)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_silence(self) -> None:
        quiet = time.monotonic() - self._last_data
        timeout = self.pool.read_timeout
        if self.transport is not None and not self.transport.is_reading():
            quiet = 0.0  # paused for a slow caller: the server is not the one being silent
            self._last_data = time.monotonic()
        if quiet < timeout:
            self._arm(timeout - quiet)
            return
        self._timer = None
        self._close(TimeoutError(f"no data for {timeout:.0f}s"))

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # bytes nobody asked for: the connection can't be trusted
            self._close()
            return
        self.received += len(data)
        self._last_data = time.monotonic()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._close(ConnectionError(f"not a valid HTTP response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._close(ConnectionError(f"connection closed{f': {exc}' if exc else ''}"))

    # --- httptools.HttpResponseParser callbacks ---------------------------------------------------

    def on_headers_complete(self) -> None:
        r = self.response
        if r is not None:
            r.status = self.parser.get_status_code()
            r._wake()

    def on_body(self, body: bytes) -> None:
        r = self.response
        if r is not None:
            r._chunks.append(body)
            r._buffered += len(body)
            if r._buffered >= HIGH_WATER and self.transport is not None:
                self.transport.pause_reading()
            r._wake()

    def on_message_complete(self) -> None:
        r = self.response
        if r is None:
            return
        r._ended = True
        r._wake()
        if not self.parser.should_keep_alive():
            self._released = False
            self.response = None
            self._close()
        elif self._released:
            self._recycle()


class Pool:
    """Keep-alive connections to one server; `request` sends on an idle one or a new one."""

    def __init__(self, host: str, port: int, *, idle_limit: float, headers: Iterable[tuple[str, str]] = (),
                 connect_timeout: float = 5.0, read_timeout: float = 300.0) -> None:
        """`idle_limit`: a connection idle this long is not reused; keep it below the server's
        keep-alive timeout, or a request sent into a connection closing just then is lost."""
        self.host, self.port = host, port
        self.idle_limit = idle_limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        fixed = [("Host", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), *headers]
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed)
        self._idle: dict[_Connection, None] = {}  # insertion-ordered: popitem() takes the newest
        self._busy: set[_Connection] = set()
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

    def _take(self) -> _Connection | None:
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

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:  # not asyncio.wait_for: on 3.11 it swallows a cancel that lands as the connection opens
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise NotSent(f"no connection within {self.connect_timeout:.0f}s") from None
        except OSError as e:  # refused, unreachable: the request's bytes went nowhere
            raise NotSent(str(e)) from e
        self._busy.add(conn)
        return conn

    def _put(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        self._idle[conn] = None

    def _forget(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        self._idle.pop(conn, None)


_TCP_ESTABLISHED = 1  # tcpi_state, the first byte of Linux's struct tcp_info


def _established(transport: asyncio.BaseTransport) -> bool:
    """Whether the kernel still holds an idle connection as open both ways. A server process that
    died closed its end at once (FIN or RST is already queued here) even when this loop has not read
    that yet; a POST written to such a connection would fail after it left, and could never be sent
    elsewhere, while a fresh connection is refused before any byte leaves (NotSent). One getsockopt."""
    if not hasattr(socket, "TCP_INFO"):
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == _TCP_ESTABLISHED)
    except OSError:
        return False

