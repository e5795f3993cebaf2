"""What the fleet's engines said and went through, kept for the status page: each engine's recent
output lines and the launcher's lines about it, and every state change, each numbered fleet-wide
so that a reader asks for what came after the last number it saw.

The engine owners write (`line`, `transition` as a `Lifecycle` listener); the gateway reads
through the launcher (`Control.journal`), never the other way round.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, TypeVar

from fleet.gateway.status import Change, LogLine
from fleet.pulse import Pulse

if TYPE_CHECKING:
    from fleet.lifecycle import EngineState, Lifecycle

LINES_KEPT = 500  # per engine
CHANGES_KEPT = 500  # fleet-wide


class Journal:
    """Recent engine output per engine, and the fleet's state changes; `changed` wakes readers."""

    def __init__(self, lines_kept: int = LINES_KEPT, changes_kept: int = CHANGES_KEPT) -> None:
        self.seq = 0
        self.lines_kept = lines_kept
        self._lines: dict[str, collections.deque[LogLine]] = {}
        self._changes: collections.deque[Change] = collections.deque(maxlen=changes_kept)
        self._changed = Pulse()

    def line(self, engine: str, text: str) -> None:
        """One line of an engine's output (or of the launcher about it)."""
        self.seq += 1
        kept = self._lines.get(engine)
        if kept is None:
            kept = self._lines[engine] = collections.deque(maxlen=self.lines_kept)
        kept.append(LogLine(self.seq, engine, time.time(), text))
        self._changed.beat()

    def transition(self, lifecycle: Lifecycle, old: EngineState, reason: str) -> None:
        """A `Lifecycle` listener: one state change."""
        self.seq += 1
        self._changes.append(Change(self.seq, lifecycle.name, time.time(), old, lifecycle.state, reason))
        self._changed.beat()

    def lines_after(self, seq: int) -> list[LogLine]:
        """Every kept line numbered above `seq`, in order."""
        found = [line for kept in self._lines.values() for line in _after(kept, seq)]
        found.sort(key=lambda line: line.seq)
        return found

    def changes_after(self, seq: int) -> list[Change]:
        """Every kept state change numbered above `seq`, in order."""
        return list(_after(self._changes, seq))

    async def wait(self, after: int) -> None:
        """Return once something numbered above `after` is here."""
        await self._changed.until(lambda: self.seq > after)


Numbered = TypeVar("Numbered", LogLine, Change)


def _after(kept: collections.deque[Numbered], seq: int) -> list[Numbered]:
    """The tail of `kept` numbered above `seq` (kept is in order: walk back from the end)."""
    out = []
    for item in reversed(kept):
        if item.seq <= seq:
            break
        out.append(item)
    out.reverse()
    return out
