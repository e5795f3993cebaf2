"""One owner per engine process: the supervisor takes stop, drain and kill as commands
(fleet.run.owner.EngineOwner, over a process of this machine), on fake engines (tests/fake_engine.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from conftest import free_port, local_owner
from fake_engine import fake_command

from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.gateway.metrics import ReplicaCounts
from fleet.lifecycle import EngineState
from fleet.run.owner import EngineOwner

S = EngineState


@pytest.fixture(autouse=True)
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_LOG_DIR", str(tmp_path / "logs"))


def engine(stop_grace: float = 15.0, **engine_args: object) -> EngineOwner:
    cfg = ModelConfig(name="m", source="fake", port=free_port(), engine_args=engine_args)
    return local_owner(cfg, fake_command, policy=SupervisorConfig(stop_grace=stop_grace, health_interval=0.2))


async def started(e: EngineOwner) -> asyncio.Task[None]:
    task = asyncio.create_task(e.run())
    async with asyncio.timeout(60):
        assert await e.lifecycle.wait_for(S.READY, S.FAILED) is S.READY
    return task


def test_kill_cuts_short_a_stop_that_waits_out_its_grace() -> None:
    async def scenario() -> None:
        e = engine(stop_grace=60, fake_ignore_sigterm=True)
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
        e = engine()
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
        e = engine()
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
