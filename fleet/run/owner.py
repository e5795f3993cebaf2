"""What every engine owner shares (`supervisor.EngineProcess` for an engine it starts,
`attached.AttachedEngine` for one it only watches): the commands others send it, its name,
`Lifecycle`, client and status lines."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.run.journal import Journal
from fleet.run.lifecycle import Lifecycle
from fleet.wire.client import EngineClient


class Commands:
    """What others may tell an engine's owner task, set here and read by the owner alone: stop
    (after draining its requests, when given), kill (now, no drain, no grace), or restart (stop
    the engine with its grace and start it anew, at once)."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._kill = asyncio.Event()
        self._restart = False
        self._wake = asyncio.Event()  # set by every command: the owner looks at what it was asked
        self._drain: Callable[[], Awaitable[None]] | None = None
        self._drain_timeout = 0.0

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


class EngineOwner(Commands):
    """One replica's engine as its owner task keeps it: settings, name ("<model>.<k>" for replica
    k), lifecycle, the gateway's client to it, and the launcher's console."""

    def __init__(self, cfg: ModelConfig, *, console: Console | None, policy: SupervisorConfig,
                 token: str | None, engine_timeout: float) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = cfg.replica_name
        self.lifecycle = Lifecycle(self.name)
        host, port = cfg.address
        self.client = EngineClient(cfg.name, host, port, token=token, timeout=engine_timeout)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.policy = policy
        self.ready_at: float | None = None
        self.total_restarts = 0
        # where it runs, for status: the file's address and GPUs, unless a cluster placed it (then its node's)
        self.node: str | None = None
        self.host, self.port = host, port
        self.gpus = list(cfg.gpus)
        self.journal: Journal | None = None  # the fleet's (the launcher sets it): its lines and state changes

    def keep_journal(self, journal: Journal) -> None:
        """Write this engine's output, the launcher's lines about it and its state changes to `journal`."""
        self.journal = journal
        self.lifecycle.listeners.append(journal.transition)

    def say(self, message: str) -> None:
        """A launcher status line about this engine (rich markup), on the console and in the journal."""
        self.console.print(f"[bold]fleet[/bold] {escape(self.name)}: {message}", highlight=False)
        if self.journal is not None:
            self.journal.line(self.name, "fleet: " + Text.from_markup(message).plain)
