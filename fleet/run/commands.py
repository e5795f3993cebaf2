"""What others may tell an engine's owner (run/owner.py), as commands the owner alone reads and acts
on: the owner's side of "one owner per resource". A command only sets what was asked and wakes
the owner; the owner decides when and how it is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Commands:
    """What others may tell an engine's owner task, set here and read by the owner alone: stop
    (after draining its requests, when given), kill (now, no drain, no grace), restart (stop the
    engine with its grace and start it anew, at once); for an engine started on demand, up (a
    request wants it) and rest (drain, stop, wait IDLE for the next request)."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._kill = asyncio.Event()
        self._restart = False
        self._wake = asyncio.Event()  # set by every command: the owner looks at what it was asked
        self._drain: Callable[[], Awaitable[None]] | None = None
        self._drain_timeout = 0.0
        self._up = False
        self._rest: tuple[Callable[[], Awaitable[None]] | None, float, int] | None = None  # (drain, timeout, level)

    @property
    def stop_requested(self) -> bool:
        """Whether it was asked to stop (or killed): then its owner task is meant to end."""
        return self._stop.is_set()

    def request_stop(self, drain: Callable[[], Awaitable[None]] | None = None, timeout: float = 0.0) -> None:
        """Command: stop; first wait for `drain()` (its requests finishing), at most `timeout` s."""
        if not self._stop.is_set():
            self._drain, self._drain_timeout = drain, timeout
        self._stop.set()
        self._wake.set()

    def request_kill(self) -> None:
        """Command: stop now, not waiting for a drain or a grace period."""
        self._kill.set()
        self._stop.set()
        self._wake.set()

    def request_restart(self) -> None:
        """Command: stop the engine (SIGTERM, then SIGKILL after the grace) and start it anew now,
        whatever its state: a failed engine that used up its restarts too."""
        self._restart = True
        self._wake.set()

    def _restart_asked(self) -> bool:
        """Whether a restart was asked (and no stop): the owner takes it, once."""
        if not self._restart or self._stop.is_set():
            return False
        self._restart = False
        self._wake.clear()
        return True
