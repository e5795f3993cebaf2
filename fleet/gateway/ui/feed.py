"""What one open status page reads: one server-sent event stream, from the state when it connects
to every change after, until the page goes.

Events (`event: <name>`, `data: <JSON>`):
- `hello` first: the gateway, whether actions are possible (an admin key is configured), whether
  prompts are shown, the sampling period, and the fleet.toml in effect (secrets masked);
- `status`: every engine's row (gateway/status.py's FleetStatus), every second and at once on a
  state change;
- `history` once (each replica's last minutes), then a `sample` per sampling (points and GPUs);
- `changes` (state changes), `logs` (engine lines) and `requests` (finished requests), each the
  backlog first, then what came after;
- `config` when a reload changed the fleet.toml in effect.

A page that reconnects (a restarted gateway, a dropped connection) gets all of it again, so it is
right after any gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from fleet.config.show import effective_toml
from fleet.gateway.control import Control
from fleet.gateway.recent import Recent
from fleet.gateway.status import GatewayStatus
from fleet.gateway.ui.history import EVERY, History

STATUS_EVERY = 1.0  # seconds between status events when nothing changes
WAIT = 0.5  # the longest a finished request or a sample waits to be sent
_json = msgspec.json.Encoder()
Send = Callable[[bytes], Awaitable[None]]


class Hello(msgspec.Struct):
    gateway: GatewayStatus
    can_act: bool  # an admin key is configured: actions are possible with it
    show_prompts: bool
    sample_every: float
    config: str  # the fleet.toml in effect, secrets masked


def event(name: str, data: Any) -> bytes:
    """One server-sent event (msgspec's JSON never holds a raw newline: one data line)."""
    return b"event: " + name.encode() + b"\ndata: " + _json.encode(data) + b"\n\n"


async def stream(control: Control, history: History, recent: Recent, send: Send, *, can_act: bool,
                 show_prompts: bool) -> None:
    """Send one page everything, then every change, until the page goes (cancelled) or the fleet stops."""
    journal = control.journal
    status, config = control.status(), control.config
    # what is here now, read at once (no await between): each cursor then means "sent up to here"
    seq, changes, lines = journal.seq, journal.changes_after(0), journal.lines_after(0)
    done, traces = recent.seq, recent.after(0)
    samples, points = history.seq, {name: list(kept) for name, kept in history.points.items()}
    await send(event("hello", Hello(status.gateway, can_act, show_prompts, EVERY, effective_toml(config))))
    await send(event("status", status))
    await send(event("history", points))
    await send(event("sample", {"points": {}, "gpus": history.gpus}))
    await send(event("changes", changes))
    await send(event("logs", lines))
    await send(event("requests", traces))
    last_status = time.monotonic()
    while not control.stopping.is_set():  # a stopping gateway waits for open answers: this one ends
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WAIT):
                await journal.wait(seq)
        seq, changes, lines = journal.seq, journal.changes_after(seq), journal.lines_after(seq)
        done, traces = recent.seq, recent.after(done)
        if lines:
            await send(event("logs", lines))
        if changes:
            await send(event("changes", changes))
        if control.config is not config:  # a reload
            config = control.config
            await send(event("config", effective_toml(config)))
        if changes or time.monotonic() - last_status >= STATUS_EVERY:
            await send(event("status", control.status()))
            last_status = time.monotonic()
        if history.seq > samples:
            samples = history.seq
            latest = {name: kept[-1] for name, kept in history.points.items() if kept}
            await send(event("sample", {"points": latest, "gpus": history.gpus}))
        if traces:
            await send(event("requests", traces))
