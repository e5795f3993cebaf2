"""One replica's engine and the single task that owns it: `EngineOwner.run`.

The owner keeps the engine's `Lifecycle` (the states and transitions: fleet/lifecycle.py), its
client and its restart counts; everything else only sends it commands: `request_stop` (after
draining, when asked), `request_kill` (now, no grace), `request_restart`. How the engine runs is its
`Runtime` (runtime.py): a process of this machine, an engine on a Ray cluster's node, or one started
elsewhere and only watched. The loop is the same for each:

    start (STARTING) -> wait until it answers (READY) -> watch until it ends or stops answering
    (FAILED) -> stop what is left, wait the backoff (RESTARTING) -> start again ...
    until a stop: drain (when asked), stop the engine (STOPPING), STOPPED

A model started on demand (`cfg.on_demand`) waits IDLE until `request_up` (a request for it
came: run/demand.py), serves, and goes back to IDLE when told to rest (it was idle, or its set
needs the room: drained, then stopped) or when it fails; it is never restarted on its own: the next
request starts it again. Told to rest at a sleep level (GPUs: vLLM's sleep mode), it is drained and
put to sleep instead, its process kept (SLEEPING), and `request_up` wakes it (WAKING, READY).

An engine fleet did not start (`restartable` False: attached) is never started, restarted or
stopped: it is waited for, watched, out of rotation (FAILED) while it does not answer and back
(READY) once it does; a stop only takes it out of the fleet.

It never dies silently (issue 16): an unexpected error is logged ("fleet.run"), fails the engine
and takes the restart path (with a backoff of its own: it never uses up `max_restarts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.errors import EngineFailure
from fleet.lifecycle import AWAY, EngineState, Lifecycle
from fleet.run.commands import Commands
from fleet.run.journal import Journal
from fleet.run.runtime import Runtime, StartFailed
from fleet.wire.client import EngineClient

HEALTH_POLL = 0.25  # while an engine fleet started is loading (one it only watches: health_interval)
KILL_RETRY, KILL_RETRY_MAX, STOP_ATTEMPTS = 0.1, 2.0, 6  # a stop again after an OSError: waits (doubling), tries if stopping
log = logging.getLogger("fleet.run")


def backoff(policy: SupervisorConfig, restarts: int) -> float:
    """Seconds to wait before restart number `restarts + 1`: doubling, capped."""
    factor: int = 2**restarts
    return min(policy.restart_backoff * factor, policy.restart_backoff_max)


class EngineOwner(Commands):
    """One replica's engine, its runtime, and the single task that owns its lifecycle."""

    def __init__(self, cfg: ModelConfig, runtime: Runtime, *, console: Console | None = None,
                 policy: SupervisorConfig | None = None, token: str | None = None,
                 engine_timeout: float = 300.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = cfg.replica_name  # "<model>.<k>" for replica k of several
        self.runtime = runtime
        self.lifecycle = Lifecycle(self.name)
        host, port = cfg.address
        self.client = EngineClient(cfg.name, host, port, token=token, timeout=engine_timeout, unix=runtime.unix_socket)
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.policy = policy or SupervisorConfig()
        self.started_at = 0.0
        self.ready_at: float | None = None
        self.restarts = 0  # in a row; what max_restarts counts
        self.total_restarts = 0
        self._errors = 0  # unexpected owner errors in a row: the backoff of their restarts
        self.wakes = 0  # times it was woken from sleep
        self.wake_seconds = 0.0  # all wakes together (a request that found it asleep waited about one)
        self.start_seconds = 0.0  # all starts together, to ready
        self.journal: Journal | None = None  # the fleet's (the launcher sets it): its lines and state changes
        runtime.bind(self)

    # --- an engine started on demand -------------------------------------------------------------

    def request_up(self) -> bool:
        """Command (an engine started on demand): start, a request waits for it. Taken only where it
        is not running or on its way down (a request during a rest starts it again after it), and
        once: whether this call asked (False: it runs, or was asked already)."""
        if self._up or self.lifecycle.state not in (EngineState.IDLE, EngineState.STOPPED, EngineState.STOPPING,
                                                     EngineState.FAILED, EngineState.SLEEPING):
            return False
        self._up = True
        self._wake.set()
        return True

    def request_rest(self, drain: Callable[[], Awaitable[None]] | None = None, timeout: float = 0.0,
                     level: int = 0) -> None:
        """Command (an engine started on demand, idle or making room): out of rotation, drain
        (`drain()`, at most `timeout` s), then stop and wait IDLE for the next request, or (`level`
        1 or 2) sleep at that vLLM sleep level, its process kept. A sleeping engine told to rest at
        level 0 stops."""
        state = self.lifecycle.state
        if state is EngineState.READY or (state is EngineState.SLEEPING and level == 0):
            self._rest = (drain, timeout, level)
            self._wake.set()

    @property
    def away(self) -> bool:
        """Holds no memory and is not on its way up: idle, asleep or stopped, and not asked up."""
        return self.lifecycle.state in AWAY and not self._up

    @property
    def leaving(self) -> bool:
        """On its way away: told to rest, draining, stopping or falling asleep."""
        return self._rest is not None or self.lifecycle.state is EngineState.STOPPING

    async def _idle_until_asked(self) -> bool:
        """IDLE (or SLEEPING, its process watched) until a request asks for the engine (True) or a
        stop comes (False); a restart asked meanwhile starts it too (a sleeping one stopped first). A
        sleeping engine that dies, or is told to rest at level 0, is stopped and waits IDLE."""
        if self.lifecycle.state not in (EngineState.IDLE, EngineState.SLEEPING):
            self.lifecycle.to(EngineState.IDLE, self._idle_reason())
        self._wake.clear()
        while not self._up:
            if self._stop.is_set():
                return False
            asleep = self.lifecycle.state is EngineState.SLEEPING
            if self._restart_asked():
                if asleep:
                    self.lifecycle.to(EngineState.STOPPING, "restart asked")
                    await self._stop_engine(self.policy.stop_grace, attempts=STOP_ATTEMPTS, now=self._kill)
                break
            if asleep and self._rest is not None:
                if not await self._rest_or_clear_failure():  # stopped, now IDLE
                    return False
                continue
            if asleep:
                await self._until_stop_or(self._watch())  # until a command, or it dies asleep
                if self.lifecycle.state is EngineState.FAILED and not await self._rest_or_clear_failure():
                    return False
            else:
                await self._wake.wait()
            self._wake.clear()
        self._up = False
        return not self._stop.is_set()

    def _idle_reason(self) -> str:
        state = self.lifecycle.state
        if state is EngineState.FAILED:
            return f"{self.lifecycle.reason}; the next request starts it again"
        if state is EngineState.STOPPING:
            return "stopped while idle; the next request starts it"
        return "starts on the model's first request"

    async def _rest_or_clear_failure(self) -> bool:
        """After serving, an engine started on demand goes back to IDLE: asked to rest (drained and
        stopped, or put to sleep: SLEEPING) or failed (what is left of it stopped); a sleeping one told
        to rest at level 0 is stopped. False: a stop came meanwhile."""
        rest, self._rest = self._rest, None
        drain, timeout, level = rest or (None, 0.0, 0)
        if self.lifecycle.state is EngineState.READY:
            self.lifecycle.to(EngineState.STOPPING, f"going to sleep (level {level})" if level else "idle")
            if drain is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await _first_of(drain(), self._stop)
            if level and not self._stop.is_set() and await self._fall_asleep(level):
                return True
        elif self.lifecycle.state is EngineState.SLEEPING:
            self.lifecycle.to(EngineState.STOPPING, "idle")
        elif self.lifecycle.state is EngineState.STARTING:  # a rest cannot reach a starting engine; a stop did
            return False
        if self.runtime.has_engine and not await self._stop_engine(self.policy.stop_grace, attempts=STOP_ATTEMPTS,
                                                                   now=self._kill):
            return False
        if self._stop.is_set():
            return False
        if self.lifecycle.state is EngineState.STOPPING:
            self.say("stopped while idle; the next request starts it")
        self.lifecycle.to(EngineState.IDLE, self._idle_reason())
        return True

    async def _fall_asleep(self, level: int) -> bool:
        """vLLM's sleep mode at `level` (the engine drained): SLEEPING, its process kept. False (said
        why): it could not, and is stopped instead."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(self.cfg.start_timeout):
                await self.client.sleep(level)
        except (EngineFailure, OSError, TimeoutError) as e:
            self.say(f"[red]could not sleep[/red] ({escape(str(e) or type(e).__name__)}): stopping it instead")
            return False
        self.ready_at = None
        self.lifecycle.to(EngineState.SLEEPING, f"asleep (level {level}); the next request wakes it")
        self.say(f"asleep at level {level} in {time.monotonic() - began:.2f}s; the next request wakes it")
        return True

    async def _wake_up(self) -> bool:
        """Out of sleep (WAKING): READY, or FAILED (then stopped and IDLE, as any failure)."""
        self.lifecycle.to(EngineState.WAKING, "a request asked for it")
        self.started_at, self.ready_at = time.monotonic(), None
        try:
            async with asyncio.timeout(self.cfg.start_timeout):
                await self.client.wake_up()
        except (EngineFailure, OSError, TimeoutError) as e:
            self._fail(f"could not wake up: {e or type(e).__name__}")
            return False
        self.ready_at = time.monotonic()
        self.wakes += 1
        self.wake_seconds += self.ready_at - self.started_at
        self.lifecycle.to(EngineState.READY, "awake")
        self.say(f"awake in {self.ready_at - self.started_at:.2f}s")
        return True

    def adopt(self, cfg: ModelConfig) -> None:
        """A config that differs from the running one only in what the engine is told at run time (its
        LoRA adapters, pushed to it by the caller): it is the one the next start uses."""
        self.cfg = cfg
        if hasattr(self.runtime, "cfg"):
            self.runtime.cfg = cfg

    # --- what status reads -----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.runtime.pid

    @property
    def tail(self) -> list[str]:
        """The engine's last output lines."""
        return list(self.runtime.tail)

    # --- its voice -------------------------------------------------------------------------------

    def keep_journal(self, journal: Journal) -> None:
        """Write this engine's output, the launcher's lines about it and its state changes to `journal`."""
        self.journal = journal
        self.lifecycle.listeners.append(journal.transition)

    def say(self, message: str) -> None:
        """A launcher status line about this engine (rich markup), on the console and in the journal."""
        self.console.print(f"[bold]fleet[/bold] {escape(self.name)}: {message}", highlight=False)
        if self.journal is not None:
            self.journal.line(self.name, "fleet: " + Text.from_markup(message).plain)

    def line(self, text: str) -> None:
        """One line of the engine's own output, into the fleet's journal (once the launcher gave it)."""
        if self.journal is not None:
            self.journal.line(self.name, text)

    # --- the loop --------------------------------------------------------------------------------

    async def run(self, *, after: float = 0.0) -> None:
        """Start, supervise and restart the engine until asked to stop; then stop it. It can run again
        (the launcher restarts an owner task that died) `after` s later; what is left is stopped first."""
        try:
            await self._terminate()  # nothing to do unless an earlier run ended half-way
            await self._stop_within(after)
            on_demand = self.cfg.on_demand and self.runtime.restartable
            # then put away when idle: the first start is at once (a set's member: when its set has room)
            at_launch = self.cfg.start == "launch" and self.cfg.swap_set is None
            while not self._stop.is_set():
                # on demand: IDLE until a request asks (a restart asked starts it from STOPPING at once)
                waits = on_demand and not at_launch and self.lifecycle.state is not EngineState.STOPPING
                at_launch = False
                if waits and not await self._idle_until_asked():
                    break
                unexpected = False
                try:
                    await self._serve()
                except Exception as e:  # not CancelledError: a cancel ends the run, and stops the engine
                    self._unexpected(e)
                    unexpected = True
                if self._stop.is_set():
                    break
                if self._restart_asked():
                    await self._restart_now()
                elif on_demand:  # idle (asked to rest) or failed: back to IDLE, never restarted on its own
                    if not await self._rest_or_clear_failure():
                        break
                elif not self.runtime.restartable:  # watched again until it answers
                    if unexpected:
                        self._errors += 1
                        await self._stop_within(backoff(self.policy, self._errors - 1))
                elif not await self._restart_after_backoff(unexpected):
                    await self._wake.wait()  # failed for good: until a stop, or a restart asked
                    if self._restart_asked():
                        await self._restart_now()
        finally:
            await self._terminate()

    async def _serve(self) -> None:
        """Start the engine (an attached one: only the first time), wait until it is ready, watch it
        until it fails or a command comes."""
        if self.lifecycle.state is EngineState.SLEEPING:
            if await self._wake_up():
                await self._until_stop_or(self._watch())
            return
        starts = self.runtime.restartable or self.lifecycle.state is EngineState.STOPPED
        if starts and not await self._start():
            return
        await self._until_stop_or(self._wait_ready())
        if self.lifecycle.state is EngineState.READY:
            await self._until_stop_or(self._watch())

    async def _start(self) -> bool:
        waiting = "" if self.runtime.restartable else f"waiting for the engine at {self.cfg.url} to answer"
        self.lifecycle.to(EngineState.STARTING, waiting)
        self.started_at, self.ready_at = time.monotonic(), None
        try:
            moved = await self.runtime.start(self.started_at + self.cfg.start_timeout, self._stop)
        except StartFailed as e:
            if not self._stop.is_set():
                self._fail(str(e))
            return False
        if moved is not None:
            await self.client.move_to(*moved)
        return True

    async def _wait_ready(self) -> None:
        """Poll until the engine answers as ready; fail at once if it ends, or at the start timeout
        (an engine fleet only watches is waited for without one)."""
        restartable = self.runtime.restartable
        deadline = self.started_at + self.cfg.start_timeout if restartable else math.inf
        poll = HEALTH_POLL if restartable else self.policy.health_interval
        ended = asyncio.create_task(self.runtime.ended())
        misses = 0
        try:
            while time.monotonic() < deadline:
                if self._stop.is_set():  # not only the cancel: a cancel swallowed below must not keep it starting
                    return
                self.runtime.notice()
                if ended.done():
                    await self._ended(f"{ended.result()} before it was ready")
                    return
                problem = await self.runtime.check(self.client, 1.0 if restartable else poll)
                if problem is None:
                    self.lifecycle.to(EngineState.READY)
                    self.ready_at = time.monotonic()
                    self.start_seconds += self.ready_at - self.started_at
                    self.say(self.runtime.ready_line(self.ready_at - self.started_at))
                    return
                misses += 1
                if not restartable and misses == 1 and self.lifecycle.state is EngineState.STARTING:
                    self.say(f"not ready yet: {escape(problem)}")
                await asyncio.wait({ended}, timeout=poll)
            self._fail(f"not ready after {self.cfg.start_timeout:.0f}s (start_timeout)")
        finally:
            ended.cancel()

    async def _watch(self) -> None:
        """While ready: fail when the engine ends or does not answer `health_failures` checks in a row."""
        ended = asyncio.create_task(self.runtime.ended())
        misses = 0
        try:
            while not self._stop.is_set():  # as in _wait_ready: the stop ends it even if its cancel got lost
                self.runtime.notice()
                await asyncio.wait({ended}, timeout=self.policy.health_interval)
                if ended.done():
                    await self._ended(f"crashed ({ended.result()})")
                    return
                if self.ready_at and time.monotonic() - self.ready_at > self.policy.restart_reset_after:
                    self.restarts = self._errors = 0
                problem = await self.runtime.check(self.client, self.policy.health_interval)
                misses = 0 if problem is None else misses + 1
                if misses < self.policy.health_failures:
                    continue
                if self.runtime.restartable:
                    self._fail(f"stopped answering /health ({misses} checks in a row)")
                else:
                    self.lifecycle.to(EngineState.FAILED, f"{problem}: out of rotation until it does")
                    self.ready_at = None
                    self.say(f"[red]out of rotation[/red]: {escape(problem or '')} ({misses} checks in a row)")
                return
        finally:
            ended.cancel()

    async def _restart_after_backoff(self, unexpected: bool = False) -> bool:
        """Stop what is left of the failed engine, wait the backoff; False once restarts are used up.
        An unexpected error (the launcher's, not the engine's) never uses them up; it backs off on its own."""
        if not await self._stop_engine(min(self.policy.stop_grace, 5.0)):
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

    async def _restart_now(self) -> None:
        """A restart was asked: the engine (what is left of it) stops with its grace, and the run loop
        starts it anew at once (STOPPING -> STARTING), with its restarts in a row forgiven."""
        self.say("restarting, as asked")
        if self.lifecycle.state is not EngineState.STOPPING:
            self.lifecycle.to(EngineState.STOPPING, "restart asked")
        if self.runtime.has_engine:
            await self._stop_engine(self.policy.stop_grace, attempts=STOP_ATTEMPTS, now=self._kill)
        self.restarts = self._errors = 0
        self.total_restarts += 1

    async def _stop_engine(self, grace: float, *, attempts: int = 0, now: asyncio.Event | None = None) -> bool:
        """The runtime's stop, again after a short backoff while it raises OSError (logged): `attempts`
        times or (0) until a stop, so that no new engine starts while the old one may hold its port.
        True: it is gone."""
        tries = 0
        while self.runtime.has_engine:
            try:
                await self.runtime.stop(grace, now)
                return True
            except OSError as e:
                tries += 1
                log.error("%s: could not make sure the engine's processes are gone (try %d): %s", self.name, tries, e,
                          exc_info=e if tries == 1 else None)
                self.say(f"[red]could not make sure its processes are gone[/red] (try {tries}): {escape(str(e))}")
                if tries == attempts:
                    return False
                delay = min(KILL_RETRY * 2 ** (tries - 1), KILL_RETRY_MAX)  # stopping: not cut short by the stop
                if await (asyncio.sleep(delay, False) if attempts else self._stop_within(delay)):
                    return False  # a stop came: _terminate takes over
        return True

    async def _terminate(self) -> None:
        """Drain (if asked), stop the engine, always end in STOPPED (also from a run that ended in
        STOPPING): after STOP_ATTEMPTS it is given up loudly (engines die with the launcher:
        PR_SET_PDEATHSIG)."""
        if self.lifecycle.state is EngineState.STOPPED:
            return
        if self._drain is not None and self.lifecycle.state is EngineState.READY:
            try:
                async with asyncio.timeout(self._drain_timeout):
                    await _first_of(self._drain(), self._kill)
            except TimeoutError:
                pass  # drained enough
            except Exception:
                log.exception("%s: draining failed; stopping the engine anyway", self.name)
        if self.lifecycle.state is EngineState.IDLE:  # on demand, not running: nothing to stop
            await self.runtime.close()
            await self.client.close()
            self.lifecycle.to(EngineState.STOPPED)
            return
        if self.lifecycle.state is not EngineState.STOPPING:
            self.lifecycle.to(EngineState.STOPPING)
        if self.runtime.has_engine:
            grace = 0.0 if self._kill.is_set() else self.policy.stop_grace
            if not await self._stop_engine(grace, attempts=STOP_ATTEMPTS, now=self._kill):
                pid = self.pid
                log.error("%s: gave up making sure engine pid %s and its processes are gone", self.name, pid)
                self.say(f"[red]gave up[/red] making sure pid {pid} and its processes are gone; they die with the launcher")
        await self.runtime.close()
        await self.client.close()
        self.lifecycle.to(EngineState.STOPPED)
        self.say(self.runtime.gone_line)

    # --- helpers ---------------------------------------------------------------------------------

    async def _stop_within(self, seconds: float, *, or_restart: bool = False) -> bool:
        """Wait `seconds`, less if a stop (or, `or_restart`, any command) comes meanwhile; True if a stop did."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await (self._wake if or_restart else self._stop).wait()
        return self._stop.is_set()

    async def _until_stop_or(self, work: Awaitable[None]) -> None:
        """Await `work` until it ends or a command comes (a stop, a restart)."""
        await _first_of(work, self._wake)

    def _unexpected(self, error: Exception) -> None:
        """An error nothing below handled: logged with its traceback; the engine FAILED with it as the reason."""
        what = f"{type(error).__name__}: {error}"
        log.error("%s: unexpected error supervising the engine (%s)", self.name, self.lifecycle.state.value, exc_info=error)
        self.say(f"[red]unexpected error[/red] supervising the engine: {escape(what)} (traceback logged)")
        self._fail(f"supervisor error: {what}")

    def _fail(self, reason: str, *, quiet: bool = False) -> bool:
        """Out of rotation as FAILED (from a state that can fail), said with the last log lines
        unless `quiet`; whether it was."""
        if self.lifecycle.state not in (EngineState.STARTING, EngineState.READY, EngineState.WAKING,
                                        EngineState.SLEEPING):
            return False
        self.lifecycle.to(EngineState.FAILED, reason)
        self.ready_at = None
        if not quiet:
            self._say_failed(reason)
        return True

    async def _ended(self, reason: str) -> None:
        """The engine ended: FAILED at once (routing stops sending to it), said once its last
        output lines came (up to a second later)."""
        if self._fail(reason, quiet=True):
            await self.runtime.last_words()
            self._say_failed(reason)

    def _say_failed(self, reason: str) -> None:
        last = "\n".join(f"    {escape(line)}" for line in self.tail[-15:])
        self.say(f"[red]failed[/red]: {escape(reason)}" + (f"; last log lines:\n{last}" if last else ""))


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
