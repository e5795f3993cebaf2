"""`Pulse`: wake every task waiting on a condition when the condition's owner changes something.

The owner calls `beat()` after each change; a waiter calls `until(check)`, which returns once
`check()` holds (at once if it already does). Each beat wakes every waiter and each looks again,
so no change is missed and nobody polls. Used where one object owns a value that others wait on:
an engine's state (fleet.lifecycle), a model's requests in flight (gateway.metrics), the journal's
newest number (run.journal).

May import: nothing of fleet (the ground floor).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Pulse:
    """One event per wait round, made only while somebody waits (a beat with no waiter is free)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def beat(self) -> None:
        """Something changed: wake every waiter."""
        if self._event is not None:
            self._event.set()
            self._event = None

    async def until(self, check: Callable[[], bool]) -> None:
        """Return once `check()` is true, looking again after every beat."""
        while not check():
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
