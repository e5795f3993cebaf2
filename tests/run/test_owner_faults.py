"""Supervision under faults (issue 16): the launcher out of file descriptors (EMFILE) while it walks an
engine's process tree and polls its /health, and an engine's owner task that dies. A supervisor never
dies silently: the error is logged with its traceback, the model's state says what happened, and
supervision goes on until the model serves again, with no process left behind.

Faults are injected where the launcher meets EMFILE for real (psutil opening files under /proc,
the engine client opening a connection), or straight into the supervisor's own calls, switched on
and off by the test; engines are tests/fake_engine.py processes. The tests wait on lifecycle
transitions and on the launcher's log records, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import psutil._common
import psutil._pslinux
import pytest
from fake_engine import fake_command
from fleets import FAST, FakeFleets, Transitions, fake, free_port
from owners import alive, family, kill_all, local_owner, wait_gone
from rich.console import Console

import fleet.run.local as local
from fleet.config.model import ModelConfig
from fleet.config.schema import SupervisorConfig
from fleet.lifecycle import EngineState
from fleet.run.owner import EngineOwner

S = EngineState


class Fault:
    """OSError(EMFILE) from the calls it is wrapped around while `on`; counts how often it struck
    (the fleet's loop runs in another thread: the test waits on a condition, not a sleep)."""

    def __init__(self) -> None:
        self.on = False
        self.struck = 0
        self.struck_here: asyncio.Event | None = None  # for a test on the same loop as the fault
        self._changed = threading.Condition()

    def strike(self, what: str) -> None:
        if self.on:
            with self._changed:
                self.struck += 1
                self._changed.notify_all()
            if self.struck_here is not None:
                self.struck_here.set()
            raise OSError(errno.EMFILE, "Too many open files (injected)", what)

    def wait_struck(self, times: int, timeout: float = 20) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.struck >= times, timeout), (
                f"the fault struck {self.struck} times in {timeout}s, wanted {times}"
            )

    def sync(self, call: Callable[..., Any], what: str) -> Callable[..., Any]:
        def faulty(*args: Any, **kwargs: Any) -> Any:
            self.strike(what)
            return call(*args, **kwargs)
        return faulty

    def coro(self, call: Callable[..., Any], what: str) -> Callable[..., Any]:
        async def faulty(*args: Any, **kwargs: Any) -> Any:
            self.strike(what)
            return await call(*args, **kwargs)
        return faulty


class LogWatch(logging.Handler):
    """The messages of logger "fleet.run" as they come, from any thread; `wait` blocks until one
    contains a text. `then(text, action)` runs `action` (on the logging thread) at such a message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self.actions: list[tuple[str, Callable[[], None]]] = []
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()
        for text, action in self.actions:
            if text in message:
                action()

    def then(self, text: str, action: Callable[[], None]) -> None:
        self.actions.append((text, action))

    def wait(self, text: str, timeout: float = 20) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: any(text in m for m in self.messages), timeout), (
                f"no {text!r} logged in {timeout}s: {self.messages}"
            )


@pytest.fixture
def fault() -> Fault:
    return Fault()


@pytest.fixture
def logged() -> Any:
    watch = LogWatch()
    logger = logging.getLogger("fleet.run")
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)


def fail_proc_reads(fault: Fault, monkeypatch: pytest.MonkeyPatch) -> None:
    """psutil's every open() under /proc fails while the fault is on: the tree walk, and the identity
    check it makes before it signals a process (what EMFILE does to it)."""
    original = psutil._common.open_binary

    def open_binary(fname: str) -> Any:
        if str(fname).startswith("/proc"):
            fault.strike(fname)
        return original(fname)

    monkeypatch.setattr(psutil._common, "open_binary", open_binary)
    monkeypatch.setattr(psutil._pslinux, "open_binary", open_binary)


@pytest.fixture
def out() -> io.StringIO:
    return io.StringIO()


def complete(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3}, timeout=20)


def reasons(f: Any, name: str) -> list[tuple[str, str]]:
    """(state, reason) of every transition of `name`'s engine from now on."""
    seen: list[tuple[str, str]] = []

    async def listen() -> None:
        f.fleet.owners[name].lifecycle.listeners.append(lambda lc, old, why: seen.append((lc.state.value, why)))

    f.call(listen())
    return seen


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fleet.run" and r.levelno >= logging.ERROR and r.exc_info]


def test_out_of_file_descriptors_in_the_tree_walk_and_health_checks_then_ready_again_by_itself(
    fake_fleet: FakeFleets, fault: Fault, logged: LogWatch, out: io.StringIO, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's case: psutil's reads of /proc and the health checks' connections fail with EMFILE
    for a while. The health checks fail the engine; its tree is killed as far as that can be done
    (its process group needs no file descriptor, a grandchild that left it does: psutil must read
    /proc to signal it safely), again and again, and no new engine starts until the old tree is
    known gone."""
    caplog.set_level(logging.ERROR, logger="fleet.run")
    f = fake_fleet(fake("m", fake_spawn_child="detach"), supervisor=FAST, console=Console(file=out, width=400))
    engine = f.fleet.owners["m"]
    old, old_proc = family(engine.pid), engine.runtime.proc
    assert len(old) == 2 and old_proc is not None  # the engine and a grandchild that left its process group
    transitions = f.transitions("m")
    fail_proc_reads(fault, monkeypatch)
    monkeypatch.setattr("fleet.wire.client.EngineClient._get", fault.coro(engine.client._get.__func__, "connect"))
    try:
        fault.on = True
        transitions.wait(lambda s: "failed" in s, "the engine failed", timeout=20)
        logged.wait("(try 3)")  # the old tree's kill, tried again and again
        assert transitions.seen[-1] == "failed", "a new engine started while the old tree could not be checked"
        assert old_proc.returncode is not None, "the engine itself outlived its process group's SIGKILL"
    finally:
        fault.on = False
        off = time.monotonic()
    seen = transitions.wait(lambda s: s[-1] == "ready" and "failed" in s, "ready again", timeout=20)
    back = transitions.at[-1] - off
    assert seen == ["ready", "failed", "restarting", "starting", "ready"]
    assert wait_gone(old) == [], "the old engine or its grandchild survived"
    assert engine.pid not in (None, old_proc.pid)
    assert complete(f.url, "m").status_code == 200
    assert "Too many open files" in out.getvalue() and "stopped answering /health" in out.getvalue()
    assert errors_logged(caplog), "no traceback logged"
    print(f"\nEMFILE in the tree walk and health checks: ready again {back:.2f}s after the fault ended")


def test_an_unexpected_error_while_supervising_is_logged_fails_the_model_and_supervision_goes_on(
    fake_fleet: FakeFleets, fault: Fault, out: io.StringIO, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Errors raised straight into the supervisor (not absorbed below it), in READY and in STARTING,
    more times in a row than max_restarts: they are the launcher's, not the engine's, so the model
    never stays failed for them."""
    caplog.set_level(logging.ERROR, logger="fleet.run")
    f = fake_fleet(fake("m"), supervisor=FAST, console=Console(file=out, width=400))
    engine = f.fleet.owners["m"]
    old = family(engine.pid)
    transitions = f.transitions("m")
    why = reasons(f, "m")
    monkeypatch.setattr(local, "descendants", fault.sync(local.descendants, "/proc/<pid>/stat"))
    monkeypatch.setattr("fleet.wire.client.EngineClient.healthy", fault.coro(engine.client.healthy.__func__, "/health"))
    try:
        fault.on = True
        transitions.wait(lambda s: s.count("failed") > FAST["max_restarts"], "failed more than max_restarts times")
    finally:
        fault.on = False
        off = time.monotonic()
    seen = transitions.wait(lambda s: s[-1] == "ready" and "failed" in s, "ready again", timeout=20)
    back = transitions.at[-1] - off
    assert seen[:4] == ["ready", "failed", "restarting", "starting"]
    failures = [reason for state, reason in why if state == "failed"]
    assert all("OSError" in r and "Too many open files" in r for r in failures), failures
    assert wait_gone(old) == []
    assert engine.pid not in (None, old[0].pid)
    assert complete(f.url, "m").status_code == 200
    logged = errors_logged(caplog)
    assert len(logged) >= len(failures) and all(r.exc_info and r.exc_info[0] is OSError for r in logged)
    assert "unexpected error" in out.getvalue()
    print(f"\n{len(failures)} supervisor errors in a row: ready again {back:.2f}s after the fault ended")


@pytest.mark.parametrize("lasting", ["a while", "for good"])
def test_the_stop_path_under_the_fault_still_reaches_stopped(
    lasting: str, fault: Fault, logged: LogWatch, out: io.StringIO, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """The stop tries again a bounded few times: a fault that ends meanwhile leaves nothing behind;
    one that lasts is given up on loudly, and the engine still ends STOPPED, its own process gone
    (its group needs no file descriptor; a grandchild that left it waits for the fault to end)."""
    monkeypatch.setenv("FLEET_LOG_DIR", str(tmp_path / "logs"))
    cfg = ModelConfig(name="m", source="fake", port=free_port(), engine_args={"fake_spawn_child": "detach"})
    engine = local_owner(cfg, fake_command, console=Console(file=out, width=400),
                         policy=SupervisorConfig(stop_grace=3, health_interval=0.2))
    tree: list[psutil.Process] = []

    async def scenario() -> list[psutil.Process]:
        task = asyncio.create_task(engine.run())
        async with asyncio.timeout(30):
            assert await engine.lifecycle.wait_for(S.READY, S.FAILED) is S.READY
        tree.extend(family(engine.pid))
        proc = engine.runtime.proc
        assert len(tree) == 2 and proc is not None
        fail_proc_reads(fault, monkeypatch)
        if lasting == "a while":
            logged.then("(try 2)", lambda: setattr(fault, "on", False))
        fault.struck_here = asyncio.Event()
        fault.on = True
        async with asyncio.timeout(10):
            await fault.struck_here.wait()  # the watch's walk of the tree failed
        began = time.monotonic()
        engine.request_stop()
        async with asyncio.timeout(20):
            await task
        assert engine.lifecycle.state is S.STOPPED
        assert proc.returncode is not None
        print(f"\nstop under EMFILE lasting {lasting}: stopped in {time.monotonic() - began:.2f}s")
        fault.on = False
        left = alive(tree)  # for good: the grandchild psutil could not signal; it holds the engine's stdout
        kill_all(left)
        async with asyncio.timeout(10):
            await proc.wait()  # the pipe closed too: nothing of the engine outlives this loop
        return left

    try:
        left = asyncio.run(scenario())
        assert "Too many open files" in out.getvalue()
        if lasting == "a while":
            assert left == [] and wait_gone(tree) == [], "the engine or its detached grandchild outlived the stop"
            assert "gave up" not in out.getvalue()
        else:
            assert [p.pid for p in left] == [tree[1].pid]  # the engine itself is gone
            assert "(try 6)" in out.getvalue() and "gave up" in out.getvalue()
            assert any("gave up" in m for m in logged.messages)
    finally:
        fault.on = False
        kill_all(tree)


def test_an_owner_task_that_dies_is_reported_and_restarted_and_the_model_serves_again(
    fake_fleet: FakeFleets, out: io.StringIO, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="fleet.run")
    original = EngineOwner.run
    runs = 0
    recorded: list[Transitions] = []

    async def run_then_die(self: EngineOwner, **kwargs: Any) -> None:
        """The first run dies once its engine is ready (its own clean-up runs, as a bug's would)."""
        nonlocal runs
        runs += 1
        if runs > 1:
            return await original(self, **kwargs)
        recorded.append(Transitions(self.lifecycle))
        inner = asyncio.create_task(original(self, **kwargs))
        await self.lifecycle.wait_for(S.READY)
        inner.cancel()
        await asyncio.gather(inner, return_exceptions=True)
        raise RuntimeError("the engine's owner task died (injected)")

    monkeypatch.setattr(EngineOwner, "run", run_then_die)
    f = fake_fleet(fake("m"), supervisor=FAST, console=Console(file=out, width=400), ready=[])
    f.wait_state("m", "ready", timeout=30)
    transitions = recorded[0]
    seen = transitions.wait(lambda s: s.count("ready") == 2, "ready again", timeout=20)
    assert seen == ["stopped", "starting", "ready", "stopping", "stopped", "starting", "ready"] and runs == 2
    assert complete(f.url, "m").status_code == 200
    logged = errors_logged(caplog)
    assert logged and logged[0].exc_info and logged[0].exc_info[0] is RuntimeError
    assert "injected" in out.getvalue()
    print(f"\nowner task died: ready again {transitions.at[-1] - transitions.at[4]:.2f}s later")


def test_a_gateway_server_that_ends_by_itself_is_reported_and_started_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The launcher's other task: a gateway server that ends while nobody asked is a loud error
    (logged with its traceback) and is started again; the engines never notice."""
    from fleet.config.load import parse_config
    from fleet.run.launcher import Fleet
    from fleet.run.process import SignalFreeServer

    serve = SignalFreeServer.serve
    engines: list[EngineOwner] = []
    calls = 0

    async def serve_then_fail_once(self: SignalFreeServer, sockets: Any = None) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            return await serve(self, sockets)
        task = asyncio.ensure_future(serve(self, sockets))
        async with asyncio.timeout(60):
            await engines[0].lifecycle.wait_for(EngineState.READY)
        self.should_exit = True
        await task
        raise RuntimeError("the server broke")

    monkeypatch.setattr(SignalFreeServer, "serve", serve_then_fail_once)
    port = free_port()
    config = parse_config({"gateway": {"port": port}, "models": [{"name": "m", "source": "fake", "port": free_port()}]})
    console = io.StringIO()

    async def scenario() -> None:
        fleet = Fleet(config, command=fake_command, echo_logs=False, console=Console(file=console))
        engines.append(fleet.owners["m"])
        running = asyncio.create_task(fleet.run())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http, asyncio.timeout(60):
            while calls < 2:  # the launcher's second server is what is awaited
                await asyncio.sleep(0.05)
            while True:  # the new server listens soon after it was started
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
                    break
                await asyncio.sleep(0.05)
        assert r.status_code == 200, r.text
        assert fleet.owners["m"].total_restarts == 0 and fleet.owners["m"].lifecycle.state is EngineState.READY
        fleet.stop()
        await running

    with caplog.at_level(logging.ERROR, logger="fleet.run"):
        asyncio.run(scenario())
    assert any("ended by itself" in r.getMessage() and r.exc_info for r in caplog.records)
    assert "its server ended by itself" in console.getvalue()


def test_a_gateway_that_cannot_start_stops_the_fleet_loudly(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    from fleet.config.load import parse_config
    from fleet.run.launcher import Fleet
    from fleet.run.process import SignalFreeServer

    async def cannot_start(self: SignalFreeServer, sockets: Any = None) -> None:
        raise RuntimeError("no server today")

    monkeypatch.setattr(SignalFreeServer, "serve", cannot_start)
    config = parse_config({"gateway": {"port": free_port()},
                           "models": [{"name": "m", "source": "fake", "port": free_port()}]})

    async def scenario() -> None:
        fleet = Fleet(config, command=fake_command, echo_logs=False, console=Console(file=io.StringIO()))
        with pytest.raises(RuntimeError, match="the gateway stopped"):
            await fleet.run()
        assert fleet.owners["m"].lifecycle.state is EngineState.STOPPED and fleet.owners["m"].pid is None

    with caplog.at_level(logging.ERROR, logger="fleet.run"):
        asyncio.run(scenario())
    assert any("the gateway stopped" in r.getMessage() and r.exc_info for r in caplog.records)
