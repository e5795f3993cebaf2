"""How one replica's engine runs, as its owner loop (owner.py) drives it: the `Runtime` interface,
and `Runtimes`, what makes one per replica for a fleet.

Three runtimes, one owner loop (as uvicorn's supervisors differ by one hook):
- `local.LocalProcess`: a child process of the launcher, in its own process group;
- `fleet.cluster.runtime.RayRuntime`: an engine on a node of a Ray cluster, inside an actor;
- `attached.Attached`: an engine started elsewhere (`fleet engine`), only watched.

The owner does everything that is the same for all of them (the lifecycle, readiness, health,
restarts with backoff, draining, the commands others send); a runtime only starts its engine,
says when it ended, answers whether it is ready, and stops it.

A new runtime: a class with the members below, and a `Runtimes` that makes it (or a branch in
the launcher's `Fleet._runtime`).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Protocol

from rich.console import Console

from fleet.config.model import ModelConfig
from fleet.wire.client import EngineClient

Address = tuple[str, int]


class StartFailed(Exception):
    """The engine could not be started (the reason is the message): the owner fails it."""


class Voice(Protocol):
    """What a runtime tells its owner (EngineOwner)."""

    def say(self, message: str) -> None:
        """A launcher line about this engine (rich markup): the console and the journal."""

    def line(self, text: str) -> None:
        """One line of the engine's own output: the journal."""


class Runtime(Protocol):
    """One replica's engine, however it runs; the owner loop calls these, and nothing else does."""

    restartable: bool  # False: fleet never starts, restarts or stops it (an attached engine)

    @property
    def unix_socket(self) -> str | None:
        """A Unix socket the engine listens on too, on this machine: its owner's client goes there."""

    @property
    def tail(self) -> collections.deque[str]:
        """Its last output lines (a failure's message quotes them)."""

    @property
    def pid(self) -> int | None:
        """The engine's process id while it runs (on its node, for a cluster's)."""

    @property
    def where(self) -> tuple[str | None, str, int, list[int]]:
        """For status: its node (a cluster's), the address and port it listens on, its GPUs."""

    @property
    def has_engine(self) -> bool:
        """Whether an engine (or what is left of one) may still run: then a stop has work to do."""

    def bind(self, voice: Voice) -> None:
        """The owner it speaks to."""

    async def start(self, deadline: float, stopping: asyncio.Event) -> Address | None:
        """Start the engine (by `deadline`, monotonic time; less if `stopping` is set meanwhile),
        saying what it does; the address it listens on when that is not the fleet file's (the
        owner's client moves there). StartFailed with the reason when it cannot."""

    def notice(self) -> None:
        """While the engine runs: note what a later stop must reach (its process tree)."""

    async def ended(self) -> str:
        """Return as soon as the engine has ended, with how it ended ("exited with code 3")."""

    async def last_words(self) -> None:
        """After it ended: wait (briefly) for its last output lines, which the failure quotes."""

    async def check(self, client: EngineClient, within: float) -> str | None:
        """None when the engine answers as ready to serve; else what is wrong."""

    async def stop(self, grace: float, now: asyncio.Event | None) -> None:
        """Stop the engine: SIGTERM, then SIGKILL after `grace` s (at once when `now` is set).
        OSError: something may be left; the owner tries again."""

    async def close(self) -> None:
        """After the last stop: its output and files."""

    def ready_line(self, took: float) -> str:
        """What the owner says once the engine is ready, `took` s after it started."""

    @property
    def gone_line(self) -> str:
        """What the owner says once it stopped."""


class Runtimes(Protocol):
    """Where the engines a fleet starts run: this machine (local.LocalRuntimes) or a cluster's
    nodes (fleet.cluster.connect.RayCluster)."""

    on_this_machine: bool  # engines share this machine's cores and ports (CPU bindings, rolling reloads)

    def runtime(self, cfg: ModelConfig, *, env: dict[str, str], console: Console, echo_logs: bool,
                token: str | None) -> Runtime:
        """The runtime of one replica's engine that fleet starts."""
