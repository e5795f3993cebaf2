"""The engine lifecycle: an explicit state enum and the one table of allowed transitions.

    STOPPED ──start──> STARTING ──health 200──> READY
                          │                       │
                          └──exit/timeout──> FAILED <──crash──┘
    FAILED ──backoff──> RESTARTING ──> STARTING
    any live state ──stop──> STOPPING ──> STOPPED

Only `Lifecycle.to` changes a state; it refuses a transition the table does not list and
notifies listeners (the console display, later metrics) on every change.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class EngineState(str, enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"
    STOPPING = "stopping"

    @property
    def serving(self) -> bool:
        """Whether requests may be sent to an engine in this state."""
        return self is EngineState.READY


S = EngineState
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.RESTARTING, S.STOPPING, S.STOPPED}),
    S.RESTARTING: frozenset({S.STARTING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
}


class InvalidTransition(RuntimeError):
    """A state change the table does not allow: a bug in the launcher, never user input."""


Listener = Callable[["Lifecycle", EngineState, str], None]


@dataclass
class Lifecycle:
    """One engine's state, when it was entered, and why."""

    name: str
    state: EngineState = EngineState.STOPPED
    since: float = field(default_factory=time.monotonic)
    reason: str = ""
    listeners: list[Listener] = field(default_factory=list)

    def to(self, new: EngineState, reason: str = "") -> None:
        """Move to `new`, or raise InvalidTransition."""
        if new not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"{self.name}: {self.state.value} -> {new.value} is not allowed")
        old, self.state, self.since, self.reason = self.state, new, time.monotonic(), reason
        for listener in self.listeners:
            listener(self, old, reason)
