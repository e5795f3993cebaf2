"""What every engine owner shares (`supervisor.EngineProcess` for an engine it starts,
`attached.AttachedEngine` for one it only watches): the commands others send it, its name,
`Lifecycle`, client and status lines."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.markup import escape

from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.run.lifecycle import Lifecycle
from fleet.wire.client import EngineClient


class Commands:
    """What others may tell an engine's owner task, set here and read by the owner alone: stop
    (after draining its requests, when given), or kill (now, no drain, no grace)."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._kill = asyncio.Event()
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

    def request_kill(self) -> None:
        """Command: stop now, not waiting for a drain or a grace period."""
        self._kill.set()
        self._stop.set()


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
        # where it runs, for status: the file's port and GPUs, unless a cluster placed it (then its node's)
        self.node: str | None = None
        self.port = port
        self.gpus = list(cfg.gpus)

    def say(self, message: str) -> None:
        """A launcher status line about this engine."""
        self.console.print(f"[bold]fleet[/bold] {escape(self.name)}: {message}", highlight=False)
