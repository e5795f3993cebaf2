"""One HTTP/1.1 exchange at a time on one keep-alive connection (http1.py pools them): the request
written in one go, the response parsed by httptools (the C parser uvicorn uses), its status and
body pieces handed to the caller as they arrive, the socket paused while the caller lags.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import httptools

# Body bytes held for a caller that has not read them yet, beyond which the socket is not read
# (TCP pushes back on the server) until the caller catches up: a slow SSE client must not make
# the gateway buffer a whole long answer.
HIGH_WATER = 256 * 1024


class Home(Protocol):
    """The pool a connection belongs to: its read timeout, and where it goes when done."""

    read_timeout: float

    def put_back(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Response:
    """One response as it arrives: `status` once `Pool.request` returns, the body by `read()`."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_ended", "_error", "_waiter", "status")

    def __init__(self, conn: Connection) -> None:
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


class Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request at a time; httptools calls the on_* methods."""

    def __init__(self, pool: Home) -> None:
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
        self.pool.put_back(self)

    def _close(self, error: BaseException | None = None) -> None:
        self._disarm()
        if self.response is not None:
            self.response._fail(error or ConnectionError("connection closed"))
            self.response = None
        self.closed = True
        self.pool.forget(self)
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
