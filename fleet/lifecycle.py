"""An engine's lifecycle, in one place: its states, which of them serve, the transitions allowed
between them, which one a model with several replicas shows, how long a client is told to wait in
each, and `Lifecycle`, the object an engine's owner keeps its state in.

    STOPPED ──start──> STARTING ──health 200──> READY
                          │                       │
                          └──exit/timeout──> FAILED <──crash / health fails──┘
    FAILED ──backoff──> RESTARTING ──> STARTING      (FAILED stays after max_restarts in a row)
    FAILED ──health 200──> READY                      (an attached engine, which fleet never restarts)
    any live state ──stop──> STOPPING ──> STOPPED
    any live state ──restart asked──> STOPPING ──> STARTING    (the status page's restart)

A model started on demand (`start = "on_demand"`, `when_idle = "stop"`) waits in IDLE:

    STOPPED ──> IDLE ──a request──> STARTING ──> READY ──idle──> STOPPING ──> IDLE
    FAILED ──> IDLE          (it is not restarted on its own: the next request starts it again)
    IDLE ──stop──> STOPPED

One that sleeps (vLLM's sleep mode, on GPUs: `when_idle = "sleep"`, or put away in its set) keeps
its process:

    READY ──put away──> STOPPING (drained) ──> SLEEPING ──a request──> WAKING ──> READY
    SLEEPING ──stop, or stopped when idle──> STOPPING;  SLEEPING / WAKING ──dies──> FAILED

Only `Lifecycle.to` changes a state; it refuses a transition the table does not list and
notifies listeners (the console display, the journal, waiters) on every change. A new state is one
member of `EngineState`, its row in `TRANSITIONS`, its place in `SHOWN_FIRST` and its retry hint,
plus the code that causes it (the owner loop: fleet/run/owner.py).

May import: fleet.errors, fleet.pulse. Everything else imports this: it is the bottom floor.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fleet.errors import InvalidTransition
from fleet.pulse import Pulse


class EngineState(enum.StrEnum):
    """Where an engine is in its lifecycle."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    IDLE = "idle"  # not running; the model's next request starts it (on demand)
    SLEEPING = "sleeping"  # running, in vLLM's sleep mode (GPU memory given back); the next request wakes it
    WAKING = "waking"  # on its way from SLEEPING to READY

    @property
    def serving(self) -> bool:
        """Whether requests may be sent to an engine in this state."""
        return self in SERVING

    @property
    def retry_after(self) -> int:
        """Seconds a client is told to wait (Retry-After) for a model in this state."""
        return RETRY_AFTER.get(self, 5)


S = EngineState
SERVING = frozenset({S.READY})
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.STOPPED: frozenset({S.STARTING, S.IDLE}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.SLEEPING: frozenset({S.WAKING, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.RESTARTING, S.STOPPING, S.STOPPED, S.READY, S.IDLE}),
    S.RESTARTING: frozenset({S.STARTING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED, S.STARTING, S.IDLE, S.SLEEPING}),
    S.IDLE: frozenset({S.STARTING, S.STOPPED}),
}
# A model with several replicas shows the state of the one closest to serving.
SHOWN_FIRST = (S.READY, S.WAKING, S.RESTARTING, S.STARTING, S.STOPPING, S.SLEEPING, S.IDLE, S.FAILED, S.STOPPED)
SETTLED = frozenset({S.READY, S.IDLE, S.FAILED, S.STOPPED})  # where a start ends up (Lifecycle.settled)
RETRY_AFTER = {S.STARTING: 10, S.RESTARTING: 10, S.FAILED: 30, S.WAKING: 2}  # others: 5
AWAY = frozenset({S.IDLE, S.SLEEPING, S.STOPPED})  # holds no GPU memory (a set's room), nor any request


def closest_to_serving(states: Iterable[EngineState]) -> EngineState:
    """The state a model shows over its replicas' states (STOPPED when it has none)."""
    present = set(states)
    return next((s for s in SHOWN_FIRST if s in present), S.STOPPED)


Listener = Callable[["Lifecycle", EngineState, str], None]


@dataclass
class Lifecycle:
    """One engine's state, when it was entered, and why."""

    name: str
    state: EngineState = EngineState.STOPPED
    since: float = field(default_factory=time.monotonic)
    reason: str = ""
    listeners: list[Listener] = field(default_factory=list)
    _changed: Pulse = field(default_factory=Pulse, repr=False)

    def to(self, new: EngineState, reason: str = "") -> None:
        """Move to `new`, or raise InvalidTransition."""
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.name}: {self.state.value} -> {new.value} is not allowed")
        old, self.state, self.since, self.reason = self.state, new, time.monotonic(), reason
        for listener in self.listeners:
            listener(self, old, reason)
        self._changed.beat()

    async def wait_for(self, *states: EngineState) -> EngineState:
        """Wait until the state is one of `states` (at once if it is already); returns it."""
        await self._changed.until(lambda: self.state in states)
        return self.state

    async def settled(self, within: float) -> EngineState:
        """READY (or IDLE: an on-demand engine waiting for its first request), or the first FAILED or
        STOPPED it reaches (seen by a listener: a FAILED that turns RESTARTING at once still counts);
        the state it is in if none came `within` s."""
        done: asyncio.Future[EngineState] = asyncio.get_running_loop().create_future()

        def listen(lc: Lifecycle, _old: EngineState, _reason: str) -> None:
            if lc.state in SETTLED and not done.done():
                done.set_result(lc.state)

        self.listeners.append(listen)
        try:
            async with asyncio.timeout(within):
                return await done
        except TimeoutError:
            return self.state
        finally:
            self.listeners.remove(listen)
