"""What one client may hold of the gateway: connections, and time to send a request.

uvicorn reads a request's headers and body with no time limit and accepts connections until the
process runs out of file descriptors (then fleet's own engine links and health checks fail too).
`guarded_protocol` is uvicorn's HTTP protocol with four bounds, as nginx and Envoy have them:

- a request's headers must arrive whole within `header_timeout` seconds of its first byte (or of
  the connection's opening): a client that trickles them (slowloris) gets 408 and is closed;
- a body may pause at most `body_timeout` seconds between two reads;
- at most `max_connections` client connections at once, and `max_per_client` from one address:
  a connection beyond either is answered 503 at once and closed, while established ones go on;
  beyond the cap, `CONTROL_RESERVE` more from this machine's loopback address may still reach the
  control routes and /health (`fleet status` works during a flood).

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

    @classmethod
    def sized(cls, *, header_timeout: float, body_timeout: float, engine_connections: int,
              max_connections: int | None = None, max_per_client: int | None = None,
              open_files: int | None = None) -> ConnectionLimits:
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
        return cls(header_timeout, body_timeout, total, per_client, backlog)


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


class ConnectionCounts:
    """Open client connections, in all and per address; one per gateway, shared by its connections."""

    def __init__(self) -> None:
        self.total = 0
        self.control = 0  # connections admitted beyond the cap, for the control routes only
        self.by_client: collections.Counter[str] = collections.Counter()
        self.refused = 0
        self.timed_out = 0


def guarded_protocol(limits: ConnectionLimits, counts: ConnectionCounts) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with `limits` enforced (pass it as uvicorn.Config's `http`)."""

    class GuardedProtocol(HttpToolsProtocol):
        _address: str | None = None
        _timer: asyncio.TimerHandle | None = None
        _in_headers = False
        _in_body = False
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
            self._arm(limits.header_timeout, self._headers_late)

        def _refuse(self, answer: bytes) -> None:
            self._refused = True
            counts.refused += 1
            self.transport.write(answer)
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
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

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if not self._in_headers:  # a later request on a kept-alive connection: its first byte is here
                self._in_headers = True
                self._arm(limits.header_timeout, self._headers_late)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            if self._control_only and not self.url.startswith(CONTROL_PATHS):
                self._disarm()
                self._refuse(BUSY)
                return
            self._in_body = True
            self._arm(limits.body_timeout, self._body_late)
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if self._refused:
                return
            self._arm(limits.body_timeout, self._body_late)  # a pause between reads is what is bounded
            super().on_body(body)

        def on_message_complete(self) -> None:
            self._in_body = False
            self._disarm()
            if not self._refused:
                super().on_message_complete()

        def _arm(self, delay: float, then: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay, then)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _headers_late(self) -> None:
            self._timer = None
            if self._in_headers and not self.transport.is_closing():
                counts.timed_out += 1
                self.transport.write(SLOW_HEADERS)
                self.transport.close()

        def _body_late(self) -> None:
            self._timer = None
            if self._in_body and not self.transport.is_closing():
                counts.timed_out += 1
                self.transport.close()  # the handler sees the client leave (http.disconnect)

    return GuardedProtocol
