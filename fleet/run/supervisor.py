"""One engine process under supervision: start, readiness, health, restarts with backoff, stop.

Each engine is a child process in its own process group (vLLM spawns helpers of its own);
stopping sends SIGTERM to the group, waits a grace period, then SIGKILLs the group and any
descendant that left it. Engines also ask the kernel for SIGTERM when the launcher dies.

`EngineProcess.run` is the single owner of the engine process, its client and its `Lifecycle`
(the states and transitions: lifecycle.py). Everything else sends it commands: `request_stop`
(after draining, when asked), `request_kill` (now, no grace). It never dies silently (issue 16):
an unexpected error is logged ("fleet.run"), fails the engine and takes the restart path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from fleet.config.model import ModelConfig
from fleet.config.placement import engine_dtype
from fleet.config.schema import ENGINE_TOKEN_ENV, SupervisorConfig
from fleet.config.sources import cache_dir
from fleet.gateway.status import EngineState
from fleet.run.output import EngineOutput
from fleet.run.owner import EngineOwner
from fleet.run.process import STOP_GRACE, descendants, stop_process_tree, wait_exit

if TYPE_CHECKING:
    import psutil

EngineCommand = Callable[[ModelConfig], Sequence[str]]
HEALTH_POLL = 0.25  # while starting
KILL_RETRY, KILL_RETRY_MAX, STOP_ATTEMPTS = 0.1, 2.0, 6  # a kill again after an OSError: waits (doubling), tries if stopping
log = logging.getLogger("fleet.run")


def engine_command(cfg: ModelConfig) -> list[str]:
    """The real engine: `python -m fleet.engine` with the model's settings."""
    return [sys.executable, "-m", "fleet.engine", "--model-json", cfg.engine_json()]


def log_dir() -> Path:
    """Where per-model engine logs go: $FLEET_LOG_DIR, else <cache>/logs."""
    return Path(os.environ.get("FLEET_LOG_DIR") or cache_dir() / "logs")


def backoff(policy: SupervisorConfig, restarts: int) -> float:
    """Seconds to wait before restart number `restarts + 1`: doubling, capped."""
    factor: int = 2**restarts
    return min(policy.restart_backoff * factor, policy.restart_backoff_max)


class EngineProcess(EngineOwner):
    """One model's engine process and the single task that owns its lifecycle (a kill: SIGKILL)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        command: EngineCommand = engine_command,
        env: dict[str, str] | None = None,
        console: Console | None = None,
        echo_logs: bool = True,
        policy: SupervisorConfig | None = None,
        token: str | None = None,
        engine_timeout: float = 300.0,
    ) -> None:
        super().__init__(cfg, console=console, policy=policy or SupervisorConfig(stop_grace=STOP_GRACE), token=token,
                         engine_timeout=engine_timeout)
        self.command = command
        self.env = {**(env or {}), **({ENGINE_TOKEN_ENV: token} if token else {})}
        self.echo_logs = echo_logs
        self.output = EngineOutput(self.name, log_dir() / f"{self.name}.log", console=self.console, echo=echo_logs,
                                   each_line=self._journal_line)
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.restarts = 0  # in a row; what max_restarts counts
        self._errors = 0  # unexpected supervisor errors in a row: the backoff of their restarts
        self._family: dict[int, psutil.Process] = {}  # descendants seen while the engine ran

    @property
    def pid(self) -> int | None:
        """The engine's process id while it runs."""
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    @property
    def tail(self) -> collections.deque[str]:
        """The engine's last output lines."""
        return self.output.tail

    def _journal_line(self, line: str) -> None:
        """One line of the engine's own output, into the fleet's journal (once the launcher gave it)."""
        if self.journal is not None:
            self.journal.line(self.name, line)

    async def run(self, *, after: float = 0.0) -> None:
        """Start, supervise and restart the engine until asked to stop; then stop it. It can run again
        (the launcher restarts an owner task that died) `after` s later; what is left is stopped first."""
        try:
            await self._terminate()  # nothing to do unless an earlier run ended half-way
            await self._stop_within(after)
            while not self._stop.is_set():
                unexpected = False
                try:
                    if await self._start():
                        await self._until_stop_or(self._wait_ready())
                        if self.lifecycle.state is EngineState.READY:
                            await self._until_stop_or(self._watch())
                except Exception as e:  # not CancelledError: a cancel ends the run, and stops the engine
                    self._unexpected(e)
                    unexpected = True
                if self._stop.is_set():
                    break
                if self._restart_asked():
                    await self._restart_now()
                elif not await self._restart_after_backoff(unexpected):
                    await self._wake.wait()  # failed for good: until a stop, or a restart asked
                    if self._restart_asked():
                        await self._restart_now()
        finally:
            await self._terminate()

    async def _stop_within(self, seconds: float, *, or_restart: bool = False) -> bool:
        """Wait `seconds`, less if a stop (or, `or_restart`, any command) comes meanwhile; True if a stop did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await (self._wake if or_restart else self._stop).wait()
        return self._stop.is_set()

    async def _until_stop_or(self, work: Awaitable[None]) -> None:
        """Await `work` until it ends or a command comes (a stop, a restart)."""
        await _first_of(work, self._wake)

    async def _restart_now(self) -> None:
        """A restart was asked: the engine (what is left of it) stops with its grace, and the run loop
        starts it anew at once (STOPPING -> STARTING), with its restarts in a row forgiven."""
        self.say("restarting, as asked")
        if self.lifecycle.state is not EngineState.STOPPING:
            self.lifecycle.to(EngineState.STOPPING, "restart asked")
        if self.has_engine:
            await self._kill_tree(self.policy.stop_grace, attempts=STOP_ATTEMPTS, now=self._kill)
        self.restarts = self._errors = 0
        self.total_restarts += 1

    async def _until_kill_or(self, work: Awaitable[None]) -> None:
        await _first_of(work, self._kill)

    async def _start(self) -> bool:
        self.lifecycle.to(EngineState.STARTING)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.cfg.gpus))
        self.started_at, self.ready_at = time.monotonic(), None
        output = await self.output.new_pipe()  # the last engine's output read and closed
        self._family, self.proc = {}, None  # the last tree is gone (_kill_tree): never signal its stale pid
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(self.cfg),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=output.write_end,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            output.close()
            self._fail(f"could not start the engine process: {e}")
            return False
        await self.output.read()
        dtype, why = engine_dtype(self.cfg)
        where = f"CPU, {dtype} ({why})" if self.cfg.on_cpu else f"GPUs {self.cfg.gpus}"
        self.say(f"starting (pid {self.proc.pid}, {where}, port {self.cfg.port}, log {self.output.path})")
        return True

    @property
    def has_engine(self) -> bool:
        """Whether an engine (or what is left of one) may still run: then a stop has work to do."""
        return self.proc is not None

    def _address(self) -> str:
        """HOST:PORT the engine listens on."""
        return f"{self.cfg.host}:{self.cfg.port}"

    def _ending(self) -> str:
        """How the engine ended, once `_exited` returned: "exited with code N"."""
        return f"exited with code {self.proc.returncode if self.proc else None}"

    async def _exited(self) -> None:
        assert self.proc is not None
        await wait_exit(self.proc)
        await self.output.read_to_end(1)  # vLLM's helpers may hold the pipe open; this only delays FAILED

    def _remember_family(self) -> None:
        """Note the engine's descendants: once it died, those that left its group can't be found."""
        if self.proc is not None and self.proc.returncode is None:
            for p in descendants(self.proc.pid):
                self._family.setdefault(p.pid, p)

    async def _wait_ready(self) -> None:
        """Poll /health until 200; fail at once if the process exits, or at the start timeout."""
        deadline = self.started_at + self.cfg.start_timeout
        exited = asyncio.create_task(self._exited())
        try:
            while time.monotonic() < deadline:
                if self._stop.is_set():  # not only the cancel: a cancel swallowed below must not keep it starting
                    return
                self._remember_family()
                if exited.done():
                    self._fail(f"{self._ending()} before it was ready")
                    return
                if await self.client.healthy(timeout=1.0):
                    self.lifecycle.to(EngineState.READY)
                    self.ready_at = time.monotonic()
                    self.say(f"[green]ready[/green] in {self.ready_at - self.started_at:.1f}s on {self._address()}")
                    return
                await asyncio.wait({exited}, timeout=HEALTH_POLL)
            self._fail(f"not ready after {self.cfg.start_timeout:.0f}s (start_timeout)")
        finally:
            exited.cancel()

    async def _watch(self) -> None:
        """While ready: fail when the process exits or /health fails too often in a row."""
        exited = asyncio.create_task(self._exited())
        failures = 0
        try:
            while not self._stop.is_set():  # as in _wait_ready: the stop ends it even if its cancel got lost
                self._remember_family()
                await asyncio.wait({exited}, timeout=self.policy.health_interval)
                if exited.done():
                    self._fail(f"crashed ({self._ending()})")
                    return
                if self.ready_at and time.monotonic() - self.ready_at > self.policy.restart_reset_after:
                    self.restarts = self._errors = 0
                failures = 0 if await self.client.healthy(timeout=self.policy.health_interval) else failures + 1
                if failures >= self.policy.health_failures:
                    self._fail(f"stopped answering /health ({failures} checks in a row)")
                    return
        finally:
            exited.cancel()

    async def _restart_after_backoff(self, unexpected: bool = False) -> bool:
        """Kill what is left of the failed engine, wait the backoff; False once restarts are used up.
        An unexpected error (the launcher's, not the engine's) never uses them up; it backs off on its own."""
        if not await self._kill_tree(min(self.policy.stop_grace, 5.0)):
            return True  # a stop came first: _terminate takes over
        if not unexpected and self.restarts >= self.policy.max_restarts:
            self.say(f"[red]stays failed[/red] after {self.restarts} restart(s) in a row")
            return False
        self._errors += unexpected
        delay = backoff(self.policy, self._errors - 1 if unexpected else self.restarts)
        which = "after a supervisor error" if unexpected else f"restart {self.restarts + 1} of at most {self.policy.max_restarts}"
        self.lifecycle.to(EngineState.RESTARTING, f"restart in {delay:.1f}s ({which})")
        self.say(f"restarting in {delay:.1f}s ({which})")
        if await self._stop_within(delay, or_restart=True):
            return True
        self._restart_asked()  # one asked meanwhile: this is it (the engine is already gone)
        self.restarts += not unexpected
        self.total_restarts += 1
        return True

    async def _kill_tree(self, grace: float, *, attempts: int = 0, now: asyncio.Event | None = None) -> bool:
        """stop_process_tree, again after a short backoff while it raises OSError (logged): `attempts` times or
        (0) until a stop, so that no new engine starts while the old tree may hold its port. True: it is gone."""
        tries = 0
        while self.proc is not None:
            try:
                await stop_process_tree(self.proc, grace=grace, also=self._family.values(), now=now)
                return True
            except OSError as e:
                tries += 1
                log.error("%s: could not make sure the engine's processes are gone (try %d): %s", self.name, tries, e, exc_info=e if tries == 1 else None)
                self.say(f"[red]could not make sure its processes are gone[/red] (try {tries}): {escape(str(e))}")
                if tries == attempts:
                    return False
                delay = min(KILL_RETRY * 2 ** (tries - 1), KILL_RETRY_MAX)  # stopping: not cut short by the stop
                if await (asyncio.sleep(delay, False) if attempts else self._stop_within(delay)):
                    return False  # a stop came: _terminate takes over
        return True

    def _unexpected(self, error: Exception) -> None:
        """An error nothing below handled: logged with its traceback; the engine FAILED with it as the reason."""
        what = f"{type(error).__name__}: {error}"
        log.error("%s: unexpected error supervising the engine (%s)", self.name, self.lifecycle.state.value, exc_info=error)
        self.say(f"[red]unexpected error[/red] supervising the engine: {escape(what)} (traceback logged)")
        self._fail(f"supervisor error: {what}")

    def _fail(self, reason: str) -> None:
        if self.lifecycle.state in (EngineState.STARTING, EngineState.READY):
            self.lifecycle.to(EngineState.FAILED, reason)
            last = "\n".join(f"    {escape(line)}" for line in list(self.tail)[-15:])
            self.say(f"[red]failed[/red]: {escape(reason)}; last log lines:\n{last}")

    async def _terminate(self) -> None:
        """Drain (if asked), stop the tree, always end in STOPPED (also from a run that ended in STOPPING):
        after STOP_ATTEMPTS a tree is given up loudly (engines die with the launcher: PR_SET_PDEATHSIG)."""
        if self.lifecycle.state is EngineState.STOPPED:
            return
        if self._drain is not None and self.lifecycle.state is EngineState.READY:
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await self._until_kill_or(self._drain())
            except TimeoutError:
                pass  # drained enough
            except Exception:
                log.exception("%s: draining failed; stopping the engine anyway", self.name)
        if self.lifecycle.state is not EngineState.STOPPING:
            self.lifecycle.to(EngineState.STOPPING)
        if self.has_engine:
            grace = 0.0 if self._kill.is_set() else self.policy.stop_grace
            if not await self._kill_tree(grace, attempts=STOP_ATTEMPTS, now=self._kill):
                pid = self.proc.pid if self.proc else None
                log.error("%s: gave up making sure engine pid %s and its processes are gone", self.name, pid)
                self.say(f"[red]gave up[/red] making sure pid {pid} and its processes are gone; they die with the launcher")
        await self.output.close()
        await self.client.close()
        self.lifecycle.to(EngineState.STOPPED)
        self.say("stopped")

async def _first_of(work: Awaitable[None], event: asyncio.Event) -> None:
    """Await `work` until it ends or `event` is set, whichever comes first; cancel the other. An
    error of `work` is raised here (issue 16: it was dropped); a cancel of this call cancels it."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, waiter):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, waiter, return_exceptions=True)
    if not task.cancelled() and (error := task.exception()) is not None:
        raise error
