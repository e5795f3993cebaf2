"""One request's bookkeeping around the engine work: admission slot, in-flight count, status,
latency and time to first token, and the client going away.

A request whose client disconnects is cancelled at once, whole or streamed (which closes the
engine connection, so the engine aborts).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from types import TracebackType

from litestar.types import HTTPResponseStartEvent, Receive, Send

from fleet.errors import CLIENT_CLOSED, ClientDisconnected, FleetError
from fleet.gateway.metrics import Metrics
from fleet.gateway.model import ServedModel
from fleet.gateway.recent import TRACE, Recent, Trace
from fleet.wire.asgi import send_chunks, unless_disconnected

SSE_START: HTTPResponseStartEvent = {"type": "http.response.start", "status": 200, "headers": [
    (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
]}


def status_of(exc: BaseException | None) -> int:
    """The HTTP status a request ended with, for metrics."""
    if exc is None:
        return 200
    if isinstance(exc, FleetError):
        return exc.status
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return CLIENT_CLOSED
    return 500


class Tracked:
    """Async context for one request to one model; leave it exactly once."""

    def __init__(self, served: ServedModel, route: str, metrics: Metrics | None, recent: Recent | None = None,
                 prompt: str | None = None) -> None:
        self.served, self.route, self.metrics, self.recent = served, route, metrics, recent
        self.started = time.perf_counter()
        self._slot: contextlib.AbstractAsyncContextManager[None] | None = None
        self._done = False
        self.trace: Trace | None = None
        if recent is not None:  # the request's task notes the replica and tokens here (routing/replicas.py)
            self.trace = Trace(at=time.time(), model=served.name, route=route, prompt=prompt)
            TRACE.set(self.trace)

    async def __aenter__(self) -> Tracked:
        if self.served.admission is not None:
            slot = self.served.admission.slot()
            try:
                await slot.__aenter__()
            except BaseException as e:
                self._record(e)
                raise
            self._slot = slot
        self.served.stats.begin()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._done:
            return
        self._done = True
        self.served.stats.end()
        if self._slot is not None:
            await self._slot.__aexit__(kind, exc, tb)
        self._record(exc)

    def _record(self, exc: BaseException | None) -> None:
        status, took = status_of(exc), time.perf_counter() - self.started
        self.served.stats.count(self.route, status)
        if self.metrics is not None:
            self.metrics.latency.labels(self.served.name, self.route).observe(took)
        if self.trace is not None and self.recent is not None:
            self.trace.status, self.trace.duration_ms = status, round(took * 1000, 1)
            self.recent.add(self.trace)

    def first_token(self) -> None:
        """The first streamed bytes left for the client."""
        took = time.perf_counter() - self.started
        if self.metrics is not None:
            self.metrics.ttft.labels(self.served.name, self.route).observe(took)
        if self.trace is not None:
            self.trace.ttft_ms = round(took * 1000, 1)

    async def send_stream(self, opening: Callable[[], Awaitable[AsyncGenerator[bytes, None]]], send: Send,
                          receive: Receive) -> None:
        """Enter this context, open the stream and send it from the handler's own task; leave the
        context once, however it ends.

        If the stream cannot open (the engine refuses, the slot is not free, the client is gone),
        that error is raised before any byte is sent, to be answered as a plain HTTP error. Once
        sending, one watcher task cancels it when the client goes (`unless_disconnected`, as for
        whole answers); Litestar's streaming response ran each body in an anyio task group beside a
        disconnect listener instead, ~95 us per stream on a 2-core VM. The events are closed at once
        however the stream ends: that closes the engine connection, which aborts the engine's request.
        """
        await self.__aenter__()
        events: AsyncGenerator[bytes, None] | None = None
        exc: BaseException | None = None
        try:
            events = await unless_disconnected(receive, opening())
            await unless_disconnected(receive, self._send_events(events, send))
        except ClientDisconnected as e:
            exc = e
            if events is None:  # before the answer started: the handler's error path, as for whole answers
                raise
            # once it started, nobody is left to answer
        except BaseException as e:
            exc = e
            raise
        finally:
            if events is not None:
                await events.aclose()
            await self.__aexit__(type(exc) if exc else None, exc, None)

    async def _send_events(self, events: AsyncIterator[bytes], send: Send) -> None:
        await send(SSE_START)
        await send_chunks(events, send, self.first_token)
