"""The launcher against fake engines: readiness, failures, stopping, no orphans, the CLI's errors.

Most tests drive one `EngineOwner` on an event loop of their own and wait on its lifecycle's
own notifications (a listener), never on sleeps. Every process a test starts is stopped, and
anything still alive at the end is killed, even when the test fails. Restarts after a failure
(backoff, max_restarts) are test_supervision.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from conftest import ROOT, FakeFleets, fleet_toml, free_port, local_owner
from fake_engine import CRASH_EXIT_CODE, fake_command
from rich.console import Console

from fleet.config.load import parse_config
from fleet.config.model import ModelConfig
from fleet.machine.probe import engine_dtype
from fleet.config.schema import SupervisorConfig
from fleet.errors import EngineFailure
from fleet.lifecycle import EngineState
from fleet.run.launcher import Fleet
from fleet.lifecycle import Lifecycle
from fleet.run.process import stop_process_tree
from fleet.run.owner import EngineOwner
from fleet.wire import protocol

S = EngineState


@pytest.fixture(autouse=True)
def log_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Engine logs of each test go to its own directory."""
    path = tmp_path / "logs"
    monkeypatch.setenv("FLEET_LOG_DIR", str(path))
    return path


def model(name: str = "m", *, start_timeout: float = 60, **engine_args: Any) -> ModelConfig:
    return ModelConfig(name=name, source="fake", port=free_port(), start_timeout=start_timeout, engine_args=engine_args)


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


def family(pid: int | None) -> list[psutil.Process]:
    """A process and all its descendants, as psutil handles (safe against pid reuse)."""
    if pid is None:
        return []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes that still run (a zombie counts as gone)."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def wait_gone(procs: list[psutil.Process], timeout: float = 5) -> list[psutil.Process]:
    """Wait (bounded) until `procs` are gone; return those still alive."""
    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def kill_all(procs: Iterable[psutil.Process]) -> None:
    for p in alive(procs):
        with contextlib.suppress(psutil.Error):
            p.kill()


# Tests of failures want them to stay failed; a restart test asks for restarts.
NO_RESTARTS = {"max_restarts": 0, "stop_grace": 5.0}


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


def test_gateway_answers_502_when_the_engine_dies_holding_the_request_then_503_with_the_reason(
    fake_fleet: FakeFleets,
) -> None:
    fleet = fake_fleet({"name": "fragile", "engine_args": {"fake_crash_after_requests": 1}}, supervisor=NO_RESTARTS,
                       timeout=30)
    body = {"model": "fragile", "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=fleet.url, timeout=15) as http:
        assert http.post("/v1/completions", json=body).status_code == 200
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 502 and r.json()["error"]["code"] == "engine_error"
        fleet.wait_state("fragile", "failed", timeout=10)
        assert http.get("/v1/models").json()["data"][0]["state"] == "failed"
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert "crashed" in r.json()["error"]["message"]


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


async def _spawn_sigterm_ignoring_tree() -> tuple[asyncio.subprocess.Process, list[psutil.Process]]:
    """A fake engine (own session, like the launcher makes) ignoring SIGTERM, with a child that does too."""
    cfg = model(fake_ignore_sigterm=True, fake_spawn_child=True)
    proc = await asyncio.create_subprocess_exec(
        *fake_command(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{cfg.port}", timeout=2) as http:
        async with asyncio.timeout(20):
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        children = (await http.get("/fake/stats")).json()["children"]
    tree = family(proc.pid)
    assert len(children) == 1 and {p.pid for p in tree} == {proc.pid, *children}
    return proc, tree


def test_stop_process_tree_sigkills_a_tree_that_ignores_sigterm_after_the_grace() -> None:
    async def scenario() -> None:
        proc, tree = await _spawn_sigterm_ignoring_tree()
        try:
            began = time.monotonic()
            await stop_process_tree(proc, grace=0.5)
            took = time.monotonic() - began
            assert 0.5 <= took < 8, took  # the grace, not the 15 s default
            assert proc.returncode == -signal.SIGKILL
            assert wait_gone(tree) == []
        finally:
            kill_all(tree)

    asyncio.run(scenario())


REAPING_ENGINE = """
import json, os, signal, subprocess, sys, time
import psutil
from fleet.run.process import ignores_sigterm, reap_children
# a helper as multiprocessing's resource tracker is: SIGTERM ignored, it ends when its pipe closes
tracker = subprocess.Popen([sys.executable, "-c", "import signal, sys; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                            "print('ready', flush=True); sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
tracker.stdout.readline()
began = time.monotonic()
reap_children(grace=5.0)
print(json.dumps({"took": time.monotonic() - began, "plain_alive": psutil.pid_exists(plain.pid), "tracker_alive": tracker.poll() is None,
                  "tracker": tracker.pid, "ignores": [ignores_sigterm(tracker.pid), ignores_sigterm(os.getpid())]}), flush=True)
os._exit(0)
"""


def test_an_engines_last_act_ends_its_helpers_without_waiting_out_one_that_ignores_sigterm() -> None:
    """reap_children terminates the engine's helpers, but a helper that ignores SIGTERM (multiprocessing's
    resource tracker) is not waited for: it cost every engine stop the whole grace. It ends by itself
    once the engine has exited."""
    import json

    out = subprocess.run([sys.executable, "-c", REAPING_ENGINE], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["took"] < 2.0, seen  # not the 5 s grace
    assert not seen["plain_alive"]  # terminated (and reaped) as before
    assert seen["tracker_alive"] and seen["ignores"] == [True, False]
    helper = []
    with contextlib.suppress(psutil.NoSuchProcess):
        helper.append(psutil.Process(seen["tracker"]))
    assert wait_gone(helper) == []  # its pipe closed with the engine


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


def test_no_process_the_fleet_started_survives_it(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet(
        {"name": "plain"},
        {"name": "with-child", "engine_args": {"fake_spawn_child": True}},
        {"name": "with-detached-child", "engine_args": {"fake_spawn_child": "detach"}},
        supervisor={"stop_grace": 5.0}, timeout=30,
    )
    procs: list[psutil.Process] = []
    try:
        for e in fleet.fleet.owners.values():
            procs += family(e.pid)
        assert len(procs) == 5  # three engines, two grandchildren
        detached = family(fleet.fleet.owners["with-detached-child"].pid)[1]
        assert os.getpgid(detached.pid) != fleet.fleet.owners["with-detached-child"].pid  # it left the group
        fleet.stop()
        assert wait_gone(procs) == []
    finally:
        kill_all(procs)


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


# --- the gateway's port and the CLI -------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_gateway_port_already_taken_raises_oserror_before_any_engine_starts(taken_port: int) -> None:
    config = parse_config({
        "gateway": {"port": taken_port},
        "models": [{"name": "m", "source": "fake", "port": free_port()}],
    })
    fleet = Fleet(config, command=fake_command, echo_logs=False)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(OSError, match=f"127.0.0.1:{taken_port}"):
        asyncio.run(fleet.run())
    engine = fleet.owners["m"]
    assert (engine.runtime.proc, engine.lifecycle.state) == (None, S.STOPPED)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv/bin/fleet"), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_cli_launch_with_the_gateway_port_taken_fails_naming_the_address(tmp_path: Path, taken_port: int) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(fleet_toml([{"name": "m", "source": "default", "port": free_port()}], taken_port))
    r = run_cli("launch", "--config", str(path))
    assert r.returncode != 0, r.stderr
    assert r.stderr.startswith("error: ") and f"127.0.0.1:{taken_port}" in r.stderr
    assert "starting" not in r.stderr  # no engine was started


@pytest.mark.parametrize(
    "entry,field,why",
    [
        ({"port": 70000}, "port", "less than or equal to 65535"),
        ({"port": 9001, "gpu": [0]}, "gpu", "unknown field"),
        ({"port": 9001, "start_timeout": -1}, "start_timeout", "greater than 0"),
    ],
    ids=["port-out-of-range", "typo", "negative-start-timeout"],
)
def test_cli_launch_with_a_bad_config_exits_2_naming_file_model_and_field(
    tmp_path: Path, entry: dict[str, Any], field: str, why: str
) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(fleet_toml([{"name": "ok", "source": "default", "port": 9000},
                                {"name": "bad-one", "source": "default", **entry}], free_port()))
    r = run_cli("launch", "--config", str(path))
    assert r.returncode == 2, r.stderr
    assert str(path) in r.stderr
    assert 'model "bad-one"' in r.stderr and "models[1]" in r.stderr
    assert f'field "{field}"' in r.stderr
    assert why in r.stderr
    assert r.stdout == ""


def test_the_launcher_and_gateway_import_neither_the_engine_stack_nor_unused_heavy_libraries() -> None:
    """The gateway side never imports torch, vllm or Ray; it also skips aiohttp, which once cost a
    quarter of a second of its start, and psutil until engines are watched. (Litestar's default
    pydantic and attrs plugins are imported: ~0.05 s, the price of no private Litestar hook.)"""
    heavy = ("torch", "vllm", "ray", "aiohttp", "psutil")
    code = ("import sys, fleet.cli, fleet.run.launcher, fleet.run.foreground; from fleet.gateway.app import create_app; create_app({}); "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "", f"imported at start: {out.stdout.strip()}"
