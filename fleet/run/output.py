"""One engine's output across its restarts: the log file, the pipe of the process now running and
the task that reads it, the last lines (a failure's message quotes them), and where every line
goes (the file, the fleet's journal, the console).

`EngineOutput` is owned by the local runtime of an engine (local.LocalProcess), which its owner calls at each
start and stop; nothing else writes to it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.markup import escape

from fleet.run.process import OutputPipe

LOG_TAIL = 40  # lines kept for a failure's message


class EngineOutput:
    """An engine's stdout and stderr: each line to its log file, `each_line` (the owner's journal)
    and (when echoing) the console."""

    def __init__(self, name: str, path: Path, *, console: Console, echo: bool, each_line: Callable[[str], None]) -> None:
        self.name, self.path = name, path
        self.console, self.echo, self.each_line = console, echo, each_line
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self._file: IO[str] | None = None
        self._pipe: OutputPipe | None = None
        self._reader: asyncio.Task[None] | None = None

    async def new_pipe(self) -> OutputPipe:
        """For a new engine process: the last one's output read to its end (1 s at most) and closed,
        the tail emptied, a new pipe whose `write_end` the spawn hands the child."""
        if self._file is None:  # held across restarts, closed at stop; once per engine, a local append
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", buffering=1)  # noqa: ASYNC230, SIM115
        await self.close_pipe(1)
        self.tail.clear()
        self._pipe = OutputPipe()
        return self._pipe

    async def read(self) -> None:
        """After the spawn: read the pipe on the loop, line by line, until it closes."""
        assert self._pipe is not None
        await self._pipe.attach()
        self._reader = asyncio.create_task(self._read(self._pipe.reader))

    async def _read(self, output: asyncio.StreamReader) -> None:
        async for raw in output:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self._file:
                self._file.write(line + "\n")
            self.each_line(line)
            if self.echo:
                self.console.print(f"[dim]{escape(self.name)} |[/dim] {escape(line)}", highlight=False)

    async def read_to_end(self, within: float) -> None:
        """Wait at most `within` s for the output to end (vLLM's helpers may hold the pipe open: the
        reader goes on after)."""
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=within)

    async def close_pipe(self, wait: float) -> None:
        """Read the output to its end for at most `wait` s, then close the pipe: the reader ends."""
        await self.read_to_end(wait)
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)  # EOF now: it ends
            self._reader = None

    async def close(self) -> None:
        """The engine stopped: its output read (5 s at most) and closed, and the log file."""
        await self.close_pipe(5)
        if self._file:
            self._file.close()
            self._file = None
