"""One long-lived connection from the gateway to an engine on its machine, every request on it.

An engine the launcher started listens on a Unix socket (fleet.run.local.engine_socket); a
connection there that opens with `MAGIC` speaks this instead of HTTP/1.1. Each request is a
stream on it, numbered by the gateway; the engine's frames of one loop turn (one vLLM step:
every request that advanced) leave in one write, and the gateway reads them in one. What a
request waits on goes at once instead: its opening, its `ACCEPTED` and its first frames (the
first token), so that gathering costs no loop turn of latency. On the
2-core VM this took the hop's CPU per 64-frame request from 250-270 us (HTTP on the same socket)
to 67-87 us in the engine process and from 233-268 to 93-113 us in the gateway at 16-256
concurrent requests (bench/hop.py; docs/benchmarks.md, "The token path: one connection").

Messages, both ways: a 9-byte header (payload length, stream number, kind; big-endian) and the
payload. The gateway sends `HELLO` (the engine token) first, and the engine answers `READY` (or
closes the connection: a wrong token); then `OPEN + route` (a msgpack request of that route: its
stream begins), `CANCEL` (the gateway left: the engine aborts it), `PAUSE` and `RESUME` (the
gateway holds HIGH_WATER bytes of the stream that its reader has not taken: the engine stops
pulling that request's outputs until told to go on, as TCP's window did per connection). The
engine sends `ACCEPTED` before any work on a stream (a connection lost before it is a request
never begun, which the gateway gives to another replica), then `FRAMES` (frames as /generate
sends them), then `END` once its answer is over; `REFUSED` (a reason) for a request it cannot
read.

May import: fleet.wire.exchange (its HIGH_WATER). Plain asyncio: used by both sides.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import struct
import time
from collections.abc import AsyncIterator, Callable, Mapping

from fleet.wire.exchange import HIGH_WATER

log = logging.getLogger("fleet.wire.mux")

MAGIC = b"fleet-mux/1\n"
HEADER = struct.Struct(">IIB")  # payload length, stream number, kind
# gateway -> engine
HELLO, CANCEL, PAUSE, RESUME = 1, 2, 3, 4
OPEN = 16  # + the route's index in ROUTES
ROUTES = ("/generate", "/embed", "/tokenize", "/detokenize")
# engine -> gateway
READY, ACCEPTED, FRAMES, END, REFUSED = 32, 33, 34, 35, 36

Answer = Callable[[bytes], AsyncIterator[bytes]]  # a request's payload -> its frames (decoding it may raise)


def opening(path: str) -> int:
    """The kind of message that opens a stream of one of the engine's frame routes."""
    return OPEN + ROUTES.index(path)


def cut(buffer: bytearray, limit: int) -> list[tuple[int, int, bytes]]:
    """The whole messages at the head of `buffer` as (kind, stream, payload), cut from it.
    ValueError for a message announced longer than `limit` bytes."""
    out, pos, end = [], 0, len(buffer)
    while end - pos >= HEADER.size:
        size, stream, kind = HEADER.unpack_from(buffer, pos)
        if size > limit:
            raise ValueError(f"a message of {size} bytes (at most {limit})")
        stop = pos + HEADER.size + size
        if stop > end:
            break
        out.append((kind, stream, bytes(buffer[pos + HEADER.size:stop])))
        pos = stop
    del buffer[:pos]
    return out


class _End(asyncio.Protocol):
    """Either end of a connection: messages read as they are whole; messages sent over one loop
    turn written together at its end."""

    transport: asyncio.Transport | None = None

    def __init__(self, limit: int) -> None:
        self.limit = limit  # the longest message the other end may send
        self.buffer = bytearray()
        self._out: list[bytes] = []
        loop = asyncio.get_running_loop()  # made on its loop, by its protocol factory
        self._call_soon, self._call_later = loop.call_soon, loop.call_later

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def _messages(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """The messages `data` completes; none, and `_broken`, for one longer than the limit."""
        self.buffer += data
        try:
            return cut(self.buffer, self.limit)
        except ValueError as e:
            self._broken(str(e))
            return []

    def _broken(self, why: str) -> None:
        raise NotImplementedError

    def send(self, kind: int, stream: int, payload: bytes = b"") -> None:
        """Queue a message: written with every other one sent this loop turn, at its end."""
        if not self._out:  # the first of this turn: written once every task woken in it has sent
            self._call_soon(self._flush)
        self._out += (HEADER.pack(len(payload), stream, kind), payload)

    def send_now(self, kind: int, stream: int, payload: bytes = b"") -> None:
        """Write a message at once (with any queued before it): for one a request waits on, where a
        loop turn of the other messages would be its latency."""
        self._out += (HEADER.pack(len(payload), stream, kind), payload)
        self._flush()

    def _flush(self) -> None:
        if self._out:  # empty when a send_now wrote this turn's messages already
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(b"".join(self._out))
            self._out.clear()


class EngineSide(_End):
    """The engine's end of one connection (after MAGIC): a task per stream, each pulling its
    answer's frames while its stream and the connection may take more."""

    def __init__(self, routes: Mapping[str, Answer], token: str | None, limit: int) -> None:
        super().__init__(limit)
        self.answers = {opening(path): answer for path, answer in routes.items()}
        self.token = token.encode() if token else None
        self.ready = False
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self.paused: dict[int, asyncio.Event] = {}  # the streams the gateway holds, each until its RESUME
        self.writable = asyncio.Event()
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        for kind, stream, payload in self._messages(data):
            if not self.ready:  # the first message: the gateway's token, or the connection ends
                if kind != HELLO or (self.token is not None and not hmac.compare_digest(payload, self.token)):
                    self._close()
                    return
                self.ready = True
                self.send(READY, 0)
            elif (answer := self.answers.get(kind)) is not None and stream not in self.tasks:
                self.tasks[stream] = asyncio.ensure_future(self._answer(stream, answer, payload))
            elif OPEN <= kind < OPEN + len(ROUTES) and kind not in self.answers:
                self.send(REFUSED, stream, f"this engine does not answer {ROUTES[kind - OPEN]}".encode())
            elif kind == CANCEL and (task := self.tasks.get(stream)) is not None:
                task.cancel()
            elif kind == PAUSE and stream in self.tasks:
                self.paused.setdefault(stream, asyncio.Event())
            elif kind == RESUME and (held := self.paused.pop(stream, None)) is not None:
                held.set()

    async def _answer(self, stream: int, answer: Answer, payload: bytes) -> None:
        try:
            frames = answer(payload)
        except Exception as e:  # a request this engine cannot read (another version's, say)
            self.send(REFUSED, stream, str(e)[:1000].encode())
            self._forget(stream)
            return
        self.send_now(ACCEPTED, stream)  # out of this process before `frames` begins any work: a death
        try:  # from here on is one of a request the engine began
            put = self.send_now  # the first frames at once (a request's first token: its latency is
            async for chunk in frames:  # the answer's), the rest gathered with the loop turn's others
                put(FRAMES, stream, chunk)
                put = self.send
                if (held := self.paused.get(stream)) is not None:
                    await held.wait()
                if not self.writable.is_set():
                    await self.writable.wait()
            self.send(END, stream)
        except asyncio.CancelledError:
            pass  # the gateway left (CANCEL), or the connection ended
        except Exception:
            log.exception("stream %d failed", stream)
            self.send(END, stream)  # the gateway reads an answer without its end: the engine lost it
        finally:
            self._forget(stream)
            await frames.aclose()  # type: ignore[attr-defined]  # aborts the request in vLLM, if it runs

    def _forget(self, stream: int) -> None:
        self.tasks.pop(stream, None)
        self.paused.pop(stream, None)

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for task in list(self.tasks.values()):
            task.cancel()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    close = _close  # the server stopping: every stream ends (the gateway takes them elsewhere)

    def _broken(self, why: str) -> None:
        self._close()


class Refused(Exception):
    """The engine could not read the request (its reason)."""


class Stream:
    """One request's answer on a GatewaySide connection, read by `GatewaySide.read`."""

    __slots__ = ("accepted", "chunks", "ended", "error", "held", "last", "number", "paused", "timeout", "timer",
                 "waiter")

    def __init__(self, number: int, timeout: float) -> None:
        self.number = number
        self.timeout = timeout  # the longest silence of the engine on it
        self.chunks: list[bytes] = []
        self.held = 0  # bytes in chunks
        self.paused = False
        self.accepted = False
        self.ended = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.last = time.monotonic()  # when the engine last sent on it
        self.timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class GatewaySide(_End):
    """The gateway's end of the connection to one engine: `open` a stream, `read` it, `close` it."""

    def __init__(self, limit: int = 1 << 30) -> None:
        super().__init__(limit)
        self.streams: dict[int, Stream] = {}
        self.numbers = itertools.count(1)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.lost: BaseException | None = None

    @classmethod
    async def connect(cls, path: str, token: str | None, timeout: float) -> GatewaySide:  # noqa: ASYNC109 - the handshake's own deadline
        """A connection to the engine's Unix socket at `path`, its token accepted; OSError or
        TimeoutError when there is none (no engine there, or one that does not speak this)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            transport, side = await loop.create_unix_connection(cls, path)
            transport.write(MAGIC + HEADER.pack(len(token or ""), 0, HELLO) + (token or "").encode())
            try:
                await side.ready
            except BaseException:
                transport.close()
                raise
        return side

    @property
    def alive(self) -> bool:
        return self.lost is None and self.transport is not None and not self.transport.is_closing()

    def open(self, path: str, request: bytes, timeout: float) -> Stream:
        """Begin a request of one of the engine's frame routes (its msgpack body); the engine silent
        on it for `timeout` seconds fails it (TimeoutError)."""
        stream = Stream(next(self.numbers), timeout)
        self.streams[stream.number] = stream
        if self.lost is not None:
            stream.error = self.lost
        else:
            self.send_now(opening(path), stream.number, request)
            stream.timer = self._call_later(timeout, self._check_silence, stream)
        return stream

    def _check_silence(self, stream: Stream) -> None:
        """The stream's silence timer: one per stream, moved on when it fires rather than per frame."""
        stream.timer = None
        if stream.ended or stream.error is not None:
            return
        now = time.monotonic()
        if stream.paused:  # held for a reader that lags: the engine is not the one being silent
            stream.last = now
        quiet = now - stream.last
        if quiet < stream.timeout:
            stream.timer = self._call_later(stream.timeout - quiet, self._check_silence, stream)
            return
        stream.error = TimeoutError(f"no data for {stream.timeout:.0f}s")
        stream.wake()

    async def read(self, stream: Stream) -> bytes:
        """The stream's frame bytes that arrived since the last read, waiting for some; b"" once its
        answer ended; the engine's silence as TimeoutError, the connection's loss as
        ConnectionError, a refusal as Refused."""
        while not stream.chunks:
            if stream.error is not None:
                raise stream.error
            if stream.ended:
                return b""
            stream.waiter = asyncio.get_running_loop().create_future()
            try:
                await stream.waiter
            finally:
                stream.waiter = None
        chunks = stream.chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        stream.held = 0
        if stream.paused and self.lost is None:
            stream.paused = False
            self.send(RESUME, stream.number)
        return data

    def close(self, stream: Stream, finished: bool = False) -> None:
        """Done with the stream; one whose answer has not `finished` (its last frame read) is
        cancelled on the engine."""
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if self.streams.pop(stream.number, None) is not None and not (finished or stream.ended) and self.lost is None:
            self.send(CANCEL, stream.number)

    def shut(self) -> None:
        """Close the connection (every stream on it fails)."""
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        for kind, number, payload in self._messages(data):
            stream = self.streams.get(number)
            if stream is None:
                if kind == READY and not self.ready.done():
                    self.ready.set_result(None)
                continue
            stream.last = now
            if kind == FRAMES:
                stream.chunks.append(payload)
                stream.held += len(payload)
                if stream.held >= HIGH_WATER and not stream.paused:
                    stream.paused = True
                    self.send(PAUSE, number)
            elif kind == ACCEPTED:
                stream.accepted = True
                continue
            elif kind == END:
                stream.ended = True
            elif kind == REFUSED:
                stream.error = Refused(payload.decode(errors="replace"))
            stream.wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(ConnectionError(f"connection closed{f': {exc}' if exc else ''}"))

    def _broken(self, why: str) -> None:
        self._lose(ConnectionError(f"engine sent {why}"))

    def _lose(self, error: BaseException) -> None:
        if self.lost is None:
            self.lost = error
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the engine closed the connection before it was ready"))
        for stream in self.streams.values():
            if not stream.ended and stream.error is None:
                stream.error = error
                stream.wake()
        if self.transport is not None:
            self.transport.close()


class Sniffer(asyncio.Protocol):
    """A server's protocol that hands a connection to `mux` if its first bytes are MAGIC, else to
    `http` (uvicorn's protocol): both on one Unix socket."""

    def __init__(self, http: Callable[[], asyncio.Protocol], mux: Callable[[], asyncio.Protocol]) -> None:
        self.http, self.mux = http, mux
        self.transport: asyncio.Transport | None = None
        self.head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.head += data
        if len(self.head) < len(MAGIC) and MAGIC.startswith(self.head):
            return  # not told apart yet
        mine = self.head.startswith(MAGIC)
        protocol = self.mux() if mine else self.http()
        rest = self.head[len(MAGIC):] if mine else self.head
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if rest:
            protocol.data_received(rest)

    def eof_received(self) -> bool | None:
        if self.transport is not None:
            self.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        pass  # closed before it said what it speaks
