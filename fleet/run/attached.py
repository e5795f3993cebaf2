"""An attached engine: one that fleet routes to but does not start (a replica's `url`), run by
`fleet engine` on its own machine.

`AttachedEngine.run` is the single owner of its lifecycle and client, like `EngineProcess` for an
engine the launcher starts, and takes the same commands (`request_stop`, `request_kill`). It only
watches: READY once the engine answers /health and accepts the fleet's token at /info; FAILED,
out of rotation, after `health_failures` unanswered checks in a row; READY again when it answers.
It never starts, restarts or stops the engine itself: stopping it here only takes it out of the
fleet, after its requests drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from rich.console import Console
from rich.markup import escape

from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.errors import EngineFailure
from fleet.gateway.status import EngineState
from fleet.run.owner import EngineOwner


class AttachedEngine(EngineOwner):
    """One replica at a `url`, health-checked; the single task that owns its lifecycle (a stop or
    kill only takes it out of the fleet)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        console: Console | None = None,
        policy: SupervisorConfig | None = None,
        token: str | None = None,
        engine_timeout: float = 300.0,
    ) -> None:
        super().__init__(cfg, console=console, policy=policy or SupervisorConfig(), token=token,
                         engine_timeout=engine_timeout)  # total_restarts stays 0: fleet never restarts it
        self.pid: int | None = None  # on another machine

    async def run(self, *, after: float = 0.0) -> None:
        """Watch the engine until asked to stop; then leave it running, out of this fleet."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(after):
                    await self._stop.wait()
            if self.lifecycle.state is EngineState.STOPPED:
                self.lifecycle.to(EngineState.STARTING, f"waiting for the engine at {self.cfg.url} to answer")
                self.say(f"attached: waiting for the engine at {self.cfg.url} (started with `fleet engine`)")
            misses = 0
            while not self._stop.is_set():
                problem = await self._check()
                misses = 0 if problem is None else misses + 1
                self._apply(problem, misses)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.policy.health_interval):
                        await self._stop.wait()
        finally:
            await self._leave()

    async def _check(self) -> str | None:
        """None when the engine answers /health and takes the token at /info; else what is wrong."""
        if not await self.client.healthy(timeout=self.policy.health_interval):
            return f"the engine at {self.cfg.url} does not answer /health"
        try:
            info = await self.client.info()
        except EngineFailure as e:
            return f"{e} (is it started with this fleet's engine token?)"
        except (OSError, TimeoutError) as e:
            return f"the engine at {self.cfg.url} did not answer /info: {e}"
        if info.model != self.cfg.name:
            return f"the engine at {self.cfg.url} serves model {info.model!r}, not {self.cfg.name!r}"
        return None

    def _apply(self, problem: str | None, misses: int) -> None:
        """The transitions of an engine fleet only watches (the table: lifecycle.py)."""
        state = self.lifecycle.state
        if problem is None and state in (EngineState.STARTING, EngineState.FAILED):
            self.lifecycle.to(EngineState.READY)
            self.ready_at = time.monotonic()
            self.say(f"[green]ready[/green]: attached engine at {self.cfg.url}")
        elif problem is not None and state is EngineState.READY and misses >= self.policy.health_failures:
            self.lifecycle.to(EngineState.FAILED, f"{problem}: out of rotation until it does")
            self.ready_at = None
            self.say(f"[red]out of rotation[/red]: {escape(problem)} ({misses} checks in a row)")
        elif problem is not None and state is EngineState.STARTING and misses == 1:
            self.say(f"not ready yet: {escape(problem)}")

    async def _leave(self) -> None:
        if self.lifecycle.state is EngineState.STOPPED:
            return
        if self._drain is not None and self.lifecycle.state is EngineState.READY and not self._kill.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._drain_timeout):
                    await self._drain()
        if self.lifecycle.state is not EngineState.FAILED:
            self.lifecycle.to(EngineState.STOPPING)
        self.lifecycle.to(EngineState.STOPPED)
        await self.client.close()
        self.say("left the fleet (the engine itself goes on)")
