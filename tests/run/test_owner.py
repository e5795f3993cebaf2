"""The owner of one engine process (fleet.run.owner.EngineOwner, over a process of this machine,
fleet.run.local), on fake engines (tests/fake_engine.py): readiness, failures before and after
ready, the start timeout, crashes whose children live on, stopping (while starting, past a
SIGTERM that is ignored), and the commands it takes: stop, drain and kill; restart backoff.

Most tests drive one `EngineOwner` on an event loop of their own and wait on its lifecycle's
own notifications (a listener), never on sleeps. Every process a test starts is stopped, and
anything still alive at the end is killed, even when the test fails. Restarts after a failure,
through a fleet, are test_launcher.py's; the owner under faults, test_owner_faults.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fake_engine import CRASH_EXIT_CODE, fake_command
from fleets import free_port
from owners import NO_RESTARTS, alive, family, kill_all, local_owner, model, wait_gone
from rich.console import Console

from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.errors import EngineFailure
from fleet.gateway.metrics import ReplicaCounts
from fleet.lifecycle import EngineState, Lifecycle
from fleet.machine.probe import engine_dtype
from fleet.run.owner import EngineOwner
from fleet.wire import protocol

S = EngineState

pytestmark = pytest.mark.usefixtures("log_dir")  # engine logs of each test go to its own directory


class States:
    """Every transition of one lifecycle, and a way to wait for a state (woken by the listener)."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.seen: list[EngineState] = []
        self.at: dict[EngineState, float] = {}
        self._changed = asyncio.Event()
        lifecycle.listeners.append(self._on_change)

    def _on_change(self, lc: Lifecycle, old: EngineState, reason: str) -> None:
        self.seen.append(lc.state)
        self.at.setdefault(lc.state, time.monotonic())
        self._changed.set()

    async def reach(self, *states: EngineState, timeout: float = 20) -> EngineState:
        """Wait until the lifecycle has entered one of `states`; return which."""
        deadline = time.monotonic() + timeout
        while not (hit := [s for s in self.seen if s in states]):
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                wanted = " or ".join(s.value for s in states)
                raise AssertionError(
                    f"no {wanted} within {timeout} s; transitions seen: {[s.value for s in self.seen]}"
                ) from None
        return hit[0]


@contextlib.asynccontextmanager
async def running(cfg: ModelConfig, **policy: Any) -> AsyncIterator[tuple[EngineOwner, States, io.StringIO]]:
    """One EngineOwner run by its own task; always stopped (bounded), leftovers killed."""
    out = io.StringIO()
    engine = local_owner(cfg, fake_command, console=Console(file=out, width=400),
                         policy=SupervisorConfig(**{**NO_RESTARTS, **policy}))
    states = States(engine.lifecycle)
    task = asyncio.create_task(engine.run())
    seen: list[psutil.Process] = []
    try:
        yield engine, states, out
    finally:
        seen += family(engine.pid)
        engine.request_stop()
        done, _ = await asyncio.wait({task}, timeout=20)
        kill_all(seen)
        if not done:  # a stop that hangs: unblock it by killing what it waits for, then report
            await asyncio.wait({task}, timeout=10)
            raise AssertionError(f"stopping the engine hung for 20 s (state {engine.lifecycle.state.value})")
        task.result()


async def spawned(engine: EngineOwner) -> list[psutil.Process]:
    """Wait until the engine process exists; return its process tree."""
    async with asyncio.timeout(15):
        while engine.runtime.proc is None:
            await asyncio.sleep(0.01)
    return family(engine.runtime.proc.pid)


async def serving(engine: EngineOwner) -> list[psutil.Process]:
    """Wait until the fake engine's server is up (its log says so); return its process tree."""
    async with asyncio.timeout(15):
        while not any("serving on" in line for line in engine.tail):
            await asyncio.sleep(0.02)
    return family(engine.pid)


async def spawned_child(engine: EngineOwner) -> psutil.Process:
    """The child a fake engine says it spawned (read from its log, which outlives the engine)."""
    async with asyncio.timeout(10):
        while not (lines := [line for line in engine.tail if "spawned child pid" in line]):
            await asyncio.sleep(0.02)
    return psutil.Process(int(lines[0].split("spawned child pid ")[1].split()[0]))


async def generate(engine: EngineOwner) -> list[protocol.Frame]:
    """One short /generate through the gateway's own engine client."""
    req = protocol.GenerateRequest(request_id="r", prompt="hi", sampling=protocol.SamplingParams(max_tokens=2))
    return [f async for batch in engine.client.generate(req) for f in batch]


# --- readiness and failure --------------------------------------------------------------------


def test_engine_becomes_ready_when_health_turns_200() -> None:
    async def scenario() -> None:
        async with running(model(fake_start_delay=1.0)) as (engine, states, out):
            assert await states.reach(S.READY, S.FAILED) is S.READY
            assert states.at[S.READY] - states.at[S.STARTING] >= 1.0
            assert "ready" in out.getvalue()
            chosen, why = engine_dtype(engine.cfg)
            assert f"CPU, {chosen} ({why})" in out.getvalue()  # the start line says the dtype and why
            frames = await generate(engine)
            assert isinstance(frames[-1], protocol.Done)
        assert states.seen == [S.STARTING, S.READY, S.STOPPING, S.STOPPED]

    asyncio.run(scenario())


def test_engine_that_exits_before_ready_fails_at_once_with_its_last_log_lines(log_dir: Path) -> None:
    async def scenario() -> None:
        async with running(model("early-exit", fake_exit_at_start=3)) as (engine, states, out):
            assert await states.reach(S.READY, S.FAILED, timeout=20) is S.FAILED
            assert states.at[S.FAILED] - states.at[S.STARTING] < 15  # not the 60 s start timeout
            assert engine.lifecycle.reason == "exited with code 3 before it was ready"
            console = out.getvalue()
            assert "failed" in console and "exited with code 3" in console
            assert "simulated start failure (exit 3)" in console  # the engine's last log lines
            assert any("simulated start failure" in line for line in engine.tail)
        assert "simulated start failure" in (log_dir / "early-exit.log").read_text()
        assert states.seen == [S.STARTING, S.FAILED, S.STOPPING, S.STOPPED]

    asyncio.run(scenario())


def test_engine_that_exits_before_ready_while_its_child_lives_on_fails_at_once() -> None:
    """The child inherited the engine's stdout, so the pipe stays open after the engine exited."""
    leftovers: list[psutil.Process] = []

    async def scenario() -> None:
        cfg = model(start_timeout=15, fake_spawn_child=True, fake_exit_at_start=3)
        async with running(cfg) as (engine, states, _out):
            leftovers.append(await spawned_child(engine))
            assert await states.reach(S.FAILED, timeout=8) is S.FAILED  # not the 15 s start_timeout
            assert engine.lifecycle.reason == "exited with code 3 before it was ready"

    try:
        asyncio.run(scenario())
        left = wait_gone(leftovers, timeout=3)
        assert not left, f"still running after the engine stopped: {left}"
    finally:
        kill_all(leftovers)


def test_engine_that_never_gets_healthy_fails_after_start_timeout() -> None:
    async def scenario() -> None:
        async with running(model(start_timeout=2, fake_hang_at_start=True)) as (engine, states, _out):
            procs = await spawned(engine)
            assert len(procs) == 1
            assert await states.reach(S.READY, S.FAILED, timeout=15) is S.FAILED
            took = states.at[S.FAILED] - states.at[S.STARTING]
            assert 2 <= took < 10, took  # the start_timeout, not much more
            assert "start_timeout" in engine.lifecycle.reason
        assert wait_gone(procs) == []  # the hung process does not outlive its engine

    asyncio.run(scenario())


def test_engine_that_crashes_after_ready_fails() -> None:
    async def scenario() -> None:
        async with running(model(fake_crash_after_requests=0)) as (engine, states, out):
            assert await states.reach(S.READY, S.FAILED) is S.READY
            with pytest.raises(EngineFailure):
                await generate(engine)
            assert await states.reach(S.FAILED) is S.FAILED
            assert engine.lifecycle.reason == f"crashed (exited with code {CRASH_EXIT_CODE})"
            assert "crashing on request 1" in out.getvalue()
        assert states.seen == [S.STARTING, S.READY, S.FAILED, S.STOPPING, S.STOPPED]

    asyncio.run(scenario())


# --- stopping -------------------------------------------------------------------------------


def test_stop_while_starting_stops_the_engine_process() -> None:
    async def scenario() -> None:
        async with running(model(fake_hang_at_start=True), stop_grace=30) as (engine, states, _out):
            procs = await serving(engine)  # up, answering /health with 503
            assert alive(procs) and states.seen == [S.STARTING]
            began = time.monotonic()
            engine.request_stop()
            assert await states.reach(S.STOPPED, timeout=20) is S.STOPPED
            assert time.monotonic() - began < 10  # SIGTERM did it, not a SIGKILL after the 30 s grace
            assert engine.pid is None
        assert states.seen == [S.STARTING, S.STOPPING, S.STOPPED]
        assert wait_gone(procs) == []

    asyncio.run(scenario())


def test_stop_while_starting_wins_even_over_a_health_check_that_swallows_its_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: the stop request itself ends the readiness poll, not only its cancel."""
    async def deaf_healthy(self: object, timeout: float = 2.0) -> bool:
        with contextlib.suppress(asyncio.CancelledError):  # as asyncio.wait_for on 3.11 could, when the cancel met a result
            await asyncio.sleep(timeout)
        return False

    monkeypatch.setattr("fleet.wire.client.EngineClient.healthy", deaf_healthy)

    async def scenario() -> None:
        async with running(model(fake_hang_at_start=True)) as (engine, states, _out):
            await serving(engine)
            engine.request_stop()
            assert await states.reach(S.STOPPED, timeout=10) is S.STOPPED
        assert states.seen == [S.STARTING, S.STOPPING, S.STOPPED]

    asyncio.run(scenario())


def test_engine_ignoring_sigterm_is_sigkilled_after_stop_grace() -> None:
    async def scenario() -> None:
        cfg = model(fake_ignore_sigterm=True, fake_spawn_child=True)
        async with running(cfg, stop_grace=0.5) as (engine, states, _out):
            assert await states.reach(S.READY, S.FAILED) is S.READY
            procs = family(engine.pid)
            proc = engine.runtime.proc
            assert len(procs) == 2
            began = time.monotonic()
            engine.request_stop()
            assert await states.reach(S.STOPPED, timeout=30) is S.STOPPED
            took = time.monotonic() - began
            assert proc is not None and proc.returncode == -signal.SIGKILL
            assert wait_gone(procs) == []
            assert 0.5 <= took < 8, f"stopping took {took:.1f}s with stop_grace = 0.5"

    asyncio.run(scenario())


def test_engine_that_crashes_while_its_child_lives_on_still_fails() -> None:
    """vLLM's EngineCore child inherits the engine's stdout: the pipe stays open after the crash."""
    leftovers: list[psutil.Process] = []

    async def scenario() -> None:
        async with running(model(fake_spawn_child=True, fake_crash_after_requests=0)) as (engine, states, _out):
            assert await states.reach(S.READY, S.FAILED) is S.READY
            leftovers.extend(family(engine.pid))
            with pytest.raises(EngineFailure):
                await generate(engine)
            assert await states.reach(S.FAILED, timeout=10) is S.FAILED
            assert engine.lifecycle.reason == f"crashed (exited with code {CRASH_EXIT_CODE})"

    try:
        asyncio.run(scenario())
        left = wait_gone(leftovers, timeout=3)
        assert not left, f"still running after the engine stopped: {left}"
    finally:
        kill_all(leftovers)


def test_crashed_engine_leaves_no_detached_grandchild_behind() -> None:
    """A descendant that left the engine's process group must not outlive the fleet, crash or not."""
    leftovers: list[psutil.Process] = []

    async def scenario() -> None:
        cfg = model(fake_spawn_child="detach", fake_crash_after_requests=0)
        async with running(cfg) as (engine, states, _out):
            assert await states.reach(S.READY, S.FAILED) is S.READY
            leftovers.extend(family(engine.pid))
            assert len(leftovers) == 2
            with pytest.raises(EngineFailure):
                await generate(engine)
            assert await states.reach(S.FAILED, timeout=10) is S.FAILED
        assert states.seen[-1] is S.STOPPED

    try:
        asyncio.run(scenario())
        left = wait_gone(leftovers, timeout=3)
        assert not left, f"the detached grandchild outlived the stopped engine: {left}"
    finally:
        kill_all(leftovers)


# --- stop, drain and kill as commands --------------------------------------------------------


def owner(stop_grace: float = 15.0, **engine_args: object) -> EngineOwner:
    cfg = ModelConfig(name="m", source="fake", port=free_port(), engine_args=engine_args)
    return local_owner(cfg, fake_command, policy=SupervisorConfig(stop_grace=stop_grace, health_interval=0.2))


async def started(e: EngineOwner) -> asyncio.Task[None]:
    task = asyncio.create_task(e.run())
    async with asyncio.timeout(60):
        assert await e.lifecycle.wait_for(S.READY, S.FAILED) is S.READY
    return task


def test_kill_cuts_short_a_stop_that_waits_out_its_grace() -> None:
    async def scenario() -> None:
        e = owner(stop_grace=60, fake_ignore_sigterm=True)
        task = await started(e)
        proc = e.runtime.proc
        e.request_stop()
        async with asyncio.timeout(10):
            await e.lifecycle.wait_for(S.STOPPING)
        began = time.monotonic()
        e.request_kill()
        async with asyncio.timeout(10):
            await task
        assert e.lifecycle.state is S.STOPPED
        assert proc is not None and proc.returncode == -signal.SIGKILL
        assert time.monotonic() - began < 5, "the kill waited for the 60 s grace"

    asyncio.run(scenario())


def test_drain_stops_the_engine_once_its_last_request_ends() -> None:
    async def scenario() -> None:
        e = owner()
        task = await started(e)
        stats = ReplicaCounts()
        stats.begin()
        e.request_stop(drain=stats.drained, timeout=60)
        await asyncio.sleep(0.5)  # nothing to wait on: the engine must *not* stop while a request runs
        assert e.lifecycle.state is S.READY and e.pid is not None
        stats.end()
        async with asyncio.timeout(20):
            await task
        assert e.lifecycle.state is S.STOPPED

    asyncio.run(scenario())


def test_drain_gives_up_after_its_timeout() -> None:
    async def scenario() -> None:
        e = owner()
        task = await started(e)
        stats = ReplicaCounts()
        stats.begin()  # never ends
        began = time.monotonic()
        e.request_stop(drain=stats.drained, timeout=0.5)
        async with asyncio.timeout(20):
            await task
        assert e.lifecycle.state is S.STOPPED
        assert time.monotonic() - began >= 0.5

    asyncio.run(scenario())


# --- restarts ----------------------------------------------------------------------------------


def test_backoff_doubles_up_to_its_cap() -> None:
    from fleet.config.schema import SupervisorConfig
    from fleet.run.owner import backoff

    policy = SupervisorConfig(restart_backoff=1, restart_backoff_max=5)
    assert [backoff(policy, n) for n in range(5)] == [1, 2, 4, 5, 5]
