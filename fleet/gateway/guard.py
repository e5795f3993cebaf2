"""What one client may hold of the gateway: connections, and time to send a request.

uvicorn reads a request's headers and body with no time limit and accepts connections until the
process runs out of file descriptors (then fleet's own engine links and health checks fail too).
`guarded_protocol` is uvicorn's HTTP protocol with four bounds, as nginx and Envoy have them:

- a request's headers must arrive whole within `header_timeout` seconds of its first byte (or of
  the connection's opening): a client that trickles them (slowloris) gets 408 and is closed;
- a request's headers (its target and header lines) hold at most `max_header_bytes`: beyond, 431
  and the connection closed, as soon as that much has arrived (httptools would otherwise buffer
  a header of any size, and the body limit does not count headers);
- a body may pause at most `body_timeout` seconds between two reads;
- at most `max_connections` client connections at once, and `max_per_client` from one address:
  a connection beyond either is answered 503 at once and closed, while established ones go on;
  beyond the cap, `CONTROL_RESERVE` more from this machine's loopback address may still reach the
  control routes and /health (`fleet status` works during a flood).

What uvicorn answers itself in plain text, a request whose framing cannot be parsed (a
`Content-Length` that is not a number, both `Content-Length` and chunked encoding, a broken
request line), is answered here in OpenAI's envelope too (400, `invalid_http_request`), and the
connection closed: after a framing error nothing more on it can be read reliably.

`ConnectionLimits.sized` derives the caps from the process's open-files limit, keeping descriptors
aside for fleet's own links (engine connections, health checks, logs, pipes) and for a burst of
connections accepted before they are refused (the listen backlog bounds it), so that a flood of
clients can never make a healthy engine look dead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import resource
from dataclasses import dataclass
from typing import Any

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleet.api.protocol import ErrorResponse
from fleet.config.schema import DEFAULT_MAX_HEADER_BYTES
from fleet.errors import FleetError

log = logging.getLogger("fleet.gateway")
FIXED_RESERVE = 64  # the launcher's own descriptors: listening socket, event loop, logs, pipes, /proc reads
PER_ENGINE_RESERVE = 8  # per engine beyond its request connections: health checks, its pipe, its log
# Beyond the cap, a few connections from this machine's own loopback address stay open to
# `fleet status / reload / stop` and /health, so the operator can look and act during a flood.
CONTROL_RESERVE = 8
CONTROL_CLIENTS = frozenset({"127.0.0.1", "::1"})
CONTROL_PATHS = (b"/fleet/", b"/health")


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds of one gateway; the caps are None when unbounded (tests of the protocol alone)."""

    header_timeout: float
    body_timeout: float
    max_connections: int | None
    max_per_client: int | None
    backlog: int = 2048  # also the most connections the event loop accepts in one go
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES

    @classmethod
    def sized(cls, *, header_timeout: float, body_timeout: float, engine_connections: int,
              max_connections: int | None = None, max_per_client: int | None = None,
              open_files: int | None = None, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> ConnectionLimits:
        """Caps from the open-files limit, less what fleet's own links may need
        (`engine_connections`: the most engine requests that may run at once, all models together)
        and a burst of accepted connections not yet refused (the event loop accepts up to `backlog`
        at a time before any is refused); values given in fleet.toml win but never exceed that."""
        if open_files is None:
            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        room = open_files - FIXED_RESERVE - engine_connections
        backlog = min(2048, max(16, room // 4))
        allowed = max(16, room - backlog)
        total = min(max_connections or allowed, allowed)
        per_client = min(max_per_client or max(1, total // 2), total)
        return cls(header_timeout, body_timeout, total, per_client, backlog, max_header_bytes)


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # e.g. above the kernel's nr_open: keep what we have
            return soft
        return target
    return soft


def _answer(status: int, reason: str, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error envelope, closing the connection."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = msgspec.json.encode(ErrorResponse.of(FleetError(message, status=status, type=kind, code=code)))
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            *(["retry-after: 1"] if status == 503 else []), "connection: close"]
    return "\r\n".join([*head, "", ""]).encode("latin-1") + body


BUSY = _answer(503, "Service Unavailable", "the gateway holds as many connections as it may; retry shortly",
               "too_many_connections")
BUSY_CLIENT = _answer(503, "Service Unavailable", "this client address holds as many connections as one client may; "
                      "retry shortly", "too_many_connections_per_client")
SLOW_HEADERS = _answer(408, "Request Timeout", "the request's headers did not arrive in time", "request_timeout")
BAD_FRAMING = _answer(400, "Bad Request", "the request is not valid HTTP/1.1: its request line, headers or framing "
                      "(Content-Length, Transfer-Encoding) cannot be parsed", "invalid_http_request")


def headers_too_large(limit: int) -> bytes:
    """431: the request's headers are larger than [gateway] max_header_bytes."""
    return _answer(431, "Request Header Fields Too Large", f"the request's headers are larger than the gateway's "
                   f"max_header_bytes ({limit} bytes)", "request_headers_too_large")


class ConnectionCounts:
    """Open client connections, in all and per address, and their deadlines; one per gateway,
    shared by its connections.

    Deadlines are not timers: a connection only writes when its current phase must end, and one
    sweep every `SWEEP` seconds (at most, a quarter of the shortest timeout) closes those past it.
    A timer per request phase cost ~0.15 ms of added latency per request on a 2-core VM (uvloop's
    timers are libuv handles); a deadline is an attribute write.
    """

    def __init__(self) -> None:
        self.total = 0
        self.control = 0  # connections admitted beyond the cap, for the control routes only
        self.by_client: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.timed_out = 0
        self.watched: set[Any] = set()  # connections with a deadline (GuardedProtocol)
        self._sweep: asyncio.TimerHandle | None = None

    def watch(self, conn: Any, loop: asyncio.AbstractEventLoop, every: float) -> None:
        """Keep `conn` in the sweep; the first one starts it."""
        self.watched.add(conn)
        if self._sweep is None or self._sweep.cancelled():
            self._sweep = loop.call_later(every, self._sweep_once, loop, every)

    def _sweep_once(self, loop: asyncio.AbstractEventLoop, every: float) -> None:
        now = loop.time()
        for conn in [c for c in self.watched if c.deadline is not None and c.deadline <= now]:
            conn.late()
        self._sweep = loop.call_later(every, self._sweep_once, loop, every) if self.watched else None


def guarded_protocol(limits: ConnectionLimits, counts: ConnectionCounts) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` enforced (pass it as uvicorn.Config's `http`)."""
    every = min(0.5, max(0.05, min(limits.header_timeout, limits.body_timeout) / 4))
    header_limit = limits.max_header_bytes
    too_large = headers_too_large(header_limit)

    class GuardedProtocol(HttpToolsProtocol):
        _address: str | None = None
        deadline: float | None = None  # when the current phase (headers, a pause in the body) must end
        _in_headers = False
        _header_bytes = 0  # bytes read while the current request's headers were incomplete
        _control_only = False
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            address = self.client[0] if self.client else ""
            if limits.max_per_client is not None and counts.by_client[address] >= limits.max_per_client:
                self._refuse(BUSY_CLIENT)
                return
            if limits.max_connections is not None and counts.total >= limits.max_connections:
                if address not in CONTROL_CLIENTS or counts.control >= CONTROL_RESERVE:
                    self._refuse(BUSY)
                    return
                self._control_only = True
                counts.control += 1
            else:
                counts.total += 1
            self._address = address
            counts.by_client[address] += 1
            self._in_headers = True  # the first request's headers are due from now
            self.deadline = self.loop.time() + limits.header_timeout
            counts.watch(self, self.loop, every)

        def _refuse(self, answer: bytes) -> None:
            self._refused = True
            counts.refused += 1
            self.transport.write(answer)
            self.transport.close()
            self.headers = []  # what a refused request's headers held goes now, not with the connection

        def connection_lost(self, exc: Exception | None) -> None:
            self.deadline = None
            counts.watched.discard(self)
            if self._address is not None:
                if self._control_only:
                    counts.control -= 1
                else:
                    counts.total -= 1
                counts.by_client[self._address] -= 1
                if not counts.by_client[self._address]:
                    del counts.by_client[self._address]
                self._address = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            """Feed the parser; count what arrives while a request's headers are incomplete, and
            refuse them once that passes the limit (the reads in which headers end are counted
            exactly instead, by on_headers_complete)."""
            if self._refused:
                return
            counting = self._in_headers
            super().data_received(data)
            if counting and self._in_headers and not self._refused:
                self._header_bytes += len(data)
                if self._header_bytes > header_limit:
                    self.deadline = None
                    self._refuse(too_large)

        def send_400_response(self, msg: str) -> None:
            """A request uvicorn's parser could not read: OpenAI's envelope, not uvicorn's plain text."""
            self.deadline = None
            self._refuse(BAD_FRAMING)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0
            if not self._in_headers:  # a later request on a kept-alive connection: its first byte is here
                self._in_headers = True
                self.deadline = self.loop.time() + limits.header_timeout

        def on_headers_complete(self) -> None:
            self._in_headers = False
            if self._control_only and not self.url.startswith(CONTROL_PATHS):
                self.deadline = None
                self._refuse(BUSY)
                return
            if len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers) > header_limit:
                self.deadline = None
                self._refuse(too_large)
                return
            self.deadline = self.loop.time() + limits.body_timeout
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._refused:
                return
            self.deadline = self.loop.time() + limits.body_timeout  # a pause between reads is what is bounded
            super().on_body(body)

        def on_message_complete(self) -> None:
            self.deadline = None
            if not self._refused:
                super().on_message_complete()

        def late(self) -> None:
            """The current phase ran past its deadline (the sweep calls this): headers late get
            408; a stalled body gets the connection closed (the handler sees the client leave)."""
            self.deadline = None
            if self.transport.is_closing():
                return
            counts.timed_out += 1
            if self._in_headers:
                self.transport.write(SLOW_HEADERS)
            self.transport.close()

    return GuardedProtocol
