"""Fleets for tests, run for real: through the CLI (`FleetProcess`, a subprocess: real engines),
in their own process with fake engines (`fake_launcher_command`, `run_fleet_script`), or in-process
(`InProcessFleet`, started by `FakeFleets` over fake engines from tests/fake_engine.py); fleet files
(`fleet_toml`, `fake_config`), free ports, and `Fleets`, the two real fleets the end-to-end tests
share. A plain module: tests import it (`from fleets import ...`); the fixtures that use it are in
conftest.py, which puts tests/ and the repository root on sys.path first."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from tiny_model import CHAT_TEMPLATE

from bench.procs import free_port, free_ports  # noqa: F401  (one copy, shared with the benchmarks; tests import both from here)

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll `check` until it holds; fail with `what` at the deadline (for what has no readiness signal)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(0.02)


def toml_value(v: Any) -> str:
    """A Python value as TOML (enough for fleet files: scalars, lists, inline tables)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def fleet_toml(models: Sequence[dict[str, Any]], port: int, host: str = "127.0.0.1", tables: str = "") -> str:
    """A fleet file for `models` (each a dict of ModelConfig fields), `tables` (TOML) before them."""
    out = [f'[gateway]\nhost = "{host}"\nport = {port}\n{tables}']
    for m in models:
        out.append("[[models]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in m.items()))
    return "\n".join(out)


class FleetProcess:
    """`fleet launch` as a real subprocess; stop() sends SIGTERM and waits."""

    def __init__(self, config_path: Path, port: int, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - the process's log, closed when it stops
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/fleet"), "launch", "--config", str(config_path), "--no-engine-logs"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )

    def log(self) -> str:
        """What the launcher printed so far."""
        return self.log_path.read_text(errors="replace")

    def states(self) -> dict[str, str]:
        """Each model's engine state, from the gateway's /health."""
        return httpx.get(f"{self.url}/health", timeout=5).json()["models"]

    def wait_ready(self, timeout: float = 300) -> None:
        """Poll /health until every model is ready (or idle: started on demand, it waits for a
        request); fail on a failed engine or launcher exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet launch exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                states = self.states()
                if any(s == "failed" for s in states.values()):
                    raise AssertionError(f"an engine failed: {states}\n{self.log()}")
                if states and all(s in ("ready", "idle") for s in states.values()):
                    return
            time.sleep(0.5)
        raise AssertionError(f"fleet not ready after {timeout}s:\n{self.log()}")

    def descendants(self) -> list[psutil.Process]:
        """Every process the launcher started (engines and vLLM's own children)."""
        with contextlib.suppress(psutil.Error):
            return psutil.Process(self.proc.pid).children(recursive=True)
        return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal the launcher and wait for it to exit; return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """Last resort in teardown: kill the launcher and everything below it."""
        family = self.descendants()
        for p in [*family, psutil.Process(self.proc.pid)] if self.proc.poll() is None else family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(10)
        self._log.close()


def status(fleet: FleetProcess) -> dict[str, dict]:
    """The gateway's row for each engine, by replica name."""
    rows = httpx.get(f"{fleet.url}/fleet/status", timeout=10).json()["models"]
    return {r["replica"]: r for r in rows}


def wait_replicas(fleet: FleetProcess, state: str, timeout: float, replicas: int = 2) -> dict[str, dict]:
    """Until all `replicas` are in `state` (the gateway's own view of each engine)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fleet.proc.poll() is not None:
            raise AssertionError(f"fleet launch exited:\n{fleet.log()}")
        with contextlib.suppress(httpx.HTTPError):
            rows = status(fleet)
            if len(rows) == replicas and all(r["state"] == state for r in rows.values()):
                return rows
        time.sleep(0.5)
    raise AssertionError(f"replicas not {state} after {timeout}s:\n{fleet.log()}")


class Steady:
    """Clients sending requests back to back (the openai SDK, no retries): when each began and how it ended."""

    def __init__(self, url: str, clients: int = 3, model: str = "tiny") -> None:
        self.url, self.model, self.stop = url, model, threading.Event()
        self.results: list[tuple[float, float, str]] = []  # began, ended, "ok" or the error
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        with openai.OpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=60) as sdk:
            k = 0
            while not self.stop.is_set():
                began, k = time.monotonic(), k + 1
                try:
                    sdk.completions.create(model=self.model, prompt=f"client {i} request {k}", max_tokens=8)
                    outcome = "ok"
                except openai.APIError as e:
                    outcome = f"{type(e).__name__}: {e}"
                self.results.append((began, time.monotonic(), outcome))

    def __enter__(self) -> Steady:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def failed(self, began_after: float = 0.0) -> list[str]:
        return [o for b, _, o in self.results if o != "ok" and b >= began_after]


@contextlib.contextmanager
def running_fleet(models: Sequence[dict[str, Any]], tmp: Path, ready_timeout: float = 300,
                  tables: str = "", env: dict[str, str] | None = None) -> Iterator[FleetProcess]:
    """Launch a fleet from `models` (and TOML `tables`) through the CLI, `env` added to its
    environment; always stop it (and anything it left) after."""
    port = free_port()
    config = tmp / "fleet.toml"
    config.write_text(fleet_toml(models, port, tables=tables))
    fleet = FleetProcess(config, port, tmp / "launcher.log", env=env)
    launched: list[psutil.Process] = []
    try:
        fleet.wait_ready(ready_timeout)
        launched = fleet.descendants()  # killed after, even if a test SIGKILLed the launcher (its children outlive it)
        yield fleet
    finally:
        family = launched + fleet.descendants()
        fleet.stop()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()


class Transitions:
    """One engine's lifecycle states as values: the one it is in when recording begins, then every
    one it enters (with when, `time.monotonic()`), recorded by a listener on the fleet's loop;
    `wait` blocks the test's thread until a condition on them holds, woken by each change."""

    def __init__(self, lifecycle: Any) -> None:
        self.seen: list[str] = [lifecycle.state.value]
        self.at: list[float] = [time.monotonic()]
        self._changed = threading.Condition()
        lifecycle.listeners.append(self._on_change)

    def _on_change(self, lifecycle: Any, old: Any, reason: str) -> None:
        with self._changed:
            self.seen.append(lifecycle.state.value)
            self.at.append(time.monotonic())
            self._changed.notify_all()

    def wait(self, check: Callable[[list[str]], bool], what: str, timeout: float = 30) -> list[str]:
        """Wait until `check(seen)` holds; return a copy of what was seen."""
        with self._changed:
            if not self._changed.wait_for(lambda: check(self.seen), timeout):
                raise AssertionError(f"not true after {timeout}s: {what}; transitions seen: {self.seen}")
            return list(self.seen)


def fake_launcher_command(tmp_path: Path, config: Path) -> list[str]:
    """A launcher in its own process, as `fleet launch` runs it (uvloop, signals, reload from the
    file), but with fake engines (tests/fake_engine.py): the command line to start it with."""
    script = tmp_path / "run_fleet.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from fake_engine import fake_command
        from fleet.cli import run_loop
        from fleet.config.load import load_config
        from fleet.run.foreground import launch
        run_loop(launch(load_config({str(config)!r}), echo_logs=False, config_path={str(config)!r},
                        command=fake_command))
    """))
    return [sys.executable, str(script)]


# Supervisor settings that make restarts and stops quick (fleets of fake engines).
FAST = {"restart_backoff": 0.2, "restart_backoff_max": 0.4, "max_restarts": 2, "health_interval": 0.2,
        "stop_grace": 3.0, "drain_timeout": 10.0}


def fake(name: str, **engine_args: Any) -> dict[str, Any]:
    """A [[models]] entry of a fake engine on a free port, whose words are its name."""
    return {"name": name, "source": "fake", "port": free_port(), "engine_args": {"fake_word": name, **engine_args}}


def run_fleet_script(tmp_path: Path, models: list[dict[str, Any]]) -> tuple[subprocess.Popen, Path, int]:
    """A launcher in its own process (fleet.run.foreground.launch with fake engines), as `fleet launch` runs it."""
    port = free_port()
    cfg_path = tmp_path / "fleet.toml"
    cfg_path.write_text(fleet_toml(models, port))
    proc = subprocess.Popen(fake_launcher_command(tmp_path, cfg_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "FLEET_LOG_DIR": str(tmp_path / "logs")})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: fleet_ready(url, [m["name"] for m in models]), "the fleet is ready")
    return proc, cfg_path, port


def fleet_ready(url: str, names: list[str]) -> bool:
    """Whether the gateway at `url` answers /health with every one of `names` ready."""
    try:
        states = httpx.get(f"{url}/health", timeout=1).json()["models"]
    except httpx.HTTPError:
        return False
    return all(states.get(n) == "ready" for n in names)


class InProcessFleet:
    """A `fleet.run.launcher.Fleet` on its own event loop in a thread, for engines made by `command`."""

    def __init__(self, config: Any, command: Any, console: Any = None) -> None:
        from fleet.run.launcher import Fleet

        self.loop = asyncio.new_event_loop()
        self.config = config
        self.url = f"http://{config.gateway.host}:{config.gateway.port}"
        self.error: BaseException | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def main() -> None:
                self.fleet = Fleet(config, command=command, console=console, echo_logs=False)
                ready.set()
                await self.fleet.run()

            try:
                self.loop.run_until_complete(main())
            except BaseException as e:  # re-raised in stop()
                self.error = e
                ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(30)
        if self.error:
            raise self.error
        fut = asyncio.run_coroutine_threadsafe(self.fleet.gateway_started.wait(), self.loop)
        deadline = time.monotonic() + 30
        while not fut.done():  # the gateway is up, or run() failed (its error is raised here)
            if self.error is not None or time.monotonic() > deadline:
                fut.cancel()
                if self.error is None:  # still running: stop it, or it outlives the test
                    self.loop.call_soon_threadsafe(self.fleet.stop)
                    self.thread.join(60)
                raise self.error or TimeoutError("the gateway did not start in 30 s")
            with contextlib.suppress(concurrent.futures.TimeoutError):
                fut.result(0.05)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the fleet's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def state(self, name: str) -> str:
        """The lifecycle state of one engine."""
        return self.fleet.owners[name].lifecycle.state.value

    def wait_state(self, name: str, *states: str, timeout: float = 60) -> str:
        """Wait until the engine of `name` is in one of `states`, woken by its lifecycle's own event
        (`Lifecycle.wait_for`), not by polling. The engine is looked up now: a reload replaces it."""
        from fleet.lifecycle import EngineState

        wanted = [EngineState(s) for s in states]

        async def reached() -> str | None:
            lifecycle = self.fleet.owners[name].lifecycle
            try:
                return (await asyncio.wait_for(lifecycle.wait_for(*wanted), timeout)).value
            except TimeoutError:
                return None

        if (state := self.call(reached(), timeout + 10)) is None:
            raise AssertionError(f"{name} still {self.state(name)} after {timeout}s, wanted {states}")
        return state

    def transitions(self, name: str) -> Transitions:
        """Record every state the engine of `name` (as of now) enters from here on."""

        async def listen() -> Transitions:
            return Transitions(self.fleet.owners[name].lifecycle)

        return self.call(listen())

    def stop(self, timeout: float = 60) -> None:
        """Stop the fleet, wait for the thread, close its event loop."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.fleet.stop)
            self.thread.join(timeout)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()
        if self.error:
            raise self.error


# --- fleets of fake engines, in-process ---------------------------------------------------------


def fake_config(*models: dict[str, Any], **tables: Any) -> Any:
    """A FleetConfig of fake engines: each model a dict of ModelConfig fields, its source "fake" and
    its port a free one unless given; `tables` are fleet.toml's other tables (gateway, supervisor,
    auth), and the gateway listens on a free loopback port unless told otherwise."""
    from fleet.config.load import parse_config

    gateway = {"host": "127.0.0.1", "port": free_port(), **tables.pop("gateway", {})}
    return parse_config({
        "gateway": gateway,
        **tables,
        "models": [{"source": "fake", "port": free_port(), **m} for m in models],
    })


class FakeFleets:
    """Starts `InProcessFleet`s of fake engines (tests/fake_engine.py); `stop_all` stops each one."""

    def __init__(self) -> None:
        self.started: list[InProcessFleet] = []

    def __call__(
        self, *models: dict[str, Any], ready: Iterable[str] | None = None, timeout: float = 60,
        console: Any = None, **tables: Any,
    ) -> InProcessFleet:
        """Start a fleet of `models` (see `fake_config`) and wait until the engines named in `ready`
        (all of them unless given) are ready; one that fails instead fails the test with its log."""
        from fake_engine import fake_command

        config = fake_config(*models, **tables)
        fleet = InProcessFleet(config, fake_command, console=console)
        self.started.append(fleet)
        engines = [r.replica_name for m in config.models for r in m.replica_configs()]
        for name in engines if ready is None else ready:
            state = fleet.wait_state(name, "ready", "failed", timeout=timeout)
            assert state == "ready", f"{name} {state}; its last log lines:\n" + "\n".join(fleet.fleet.owners[name].tail)
        return fleet

    def stop_all(self) -> None:
        """Stop every fleet started here (each one, even if stopping another failed)."""
        errors: list[BaseException] = []
        while self.started:
            try:
                self.started.pop().stop()
            except BaseException as e:  # re-raised below, after the others stopped
                errors.append(e)
        if errors:
            raise errors[0]


@contextlib.contextmanager
def fake_fleets() -> Iterator[FakeFleets]:
    """A FakeFleets whose fleets are all stopped when the block ends, however it ends."""
    fleets = FakeFleets()
    try:
        yield fleets
    finally:
        fleets.stop_all()


# --- real fleets, shared by every end-to-end module (the fixtures: tests/e2e/conftest.py) -----
# Two fleets start together the first time a test needs one (their engines load in parallel):
# "tiny": tiny random-weight models routed by name: tiny-a and tiny-b with different seeds (tiny-b
# streams three tokens at a time after its first: vLLM's stream_interval, an opt-in through
# engine_args; tiny-a reads tool calls with vLLM's llama3_json parser), and tiny-r, tiny-a's weights
# with vLLM's deepseek_r1 reasoning parser;
# "default": the packaged default model, SmolLM2-135M-Instruct, in float32: its greedy answers are
# then the same on every CPU (in bfloat16 they follow the CPU's kernels: an AMX Xeon answers the
# capital of France with "L'Étoile, la Marseillaise...", an AVX2 EPYC with "Paris").

TINY = {"dtype": "float32", "max_model_len": 512, "kv_cache_gib": 0.05}


class Fleets:
    """Both fleets, launched at once; each is waited for when first used."""

    def __init__(self, tmp: Path, tiny_a: Path, tiny_b: Path) -> None:
        template = tmp / "chat_template.jinja"  # tiny-b's tokenizer has none: fleet.toml gives it one
        template.write_text(CHAT_TEMPLATE)
        self.tiny = self._launch(tmp / "tiny", [
            # tiny-a reads tool calls in Llama 3's JSON form (tool_choice "auto"); tiny-r is tiny-a's
            # weights with a reasoning parser (everything before </think> is reasoning)
            {"name": "tiny-a", "source": str(tiny_a), "port": free_port(), "tool_parser": "llama3_json", **TINY},
            {"name": "tiny-b", "source": str(tiny_b), "port": free_port(), "chat_template": str(template),
             "engine_args": {"stream_interval": 3}, **TINY},
            {"name": "tiny-r", "source": str(tiny_a), "port": free_port(), "reasoning_parser": "deepseek_r1", **TINY},
        ])
        # the default model's one engine on every core, given (so it starts with its worker in its
        # EngineCore: engine/args.py); the embedding module's engine keeps vLLM's own "auto" way
        every_core = ",".join(map(str, sorted(os.sched_getaffinity(0))))
        self.default = self._launch(tmp / "default", [
            {"name": "smollm2", "source": "default", "port": free_port(), "max_model_len": 2048, "dtype": "float32",
             "tool_parser": "pythonic"},  # a parser that needs no markup tokens: "auto" answers in words here
        ], env={"VLLM_CPU_OMP_THREADS_BIND": every_core})
        self._ready: set[str] = set()

    @staticmethod
    def _launch(tmp: Path, models: list[dict], env: dict[str, str] | None = None) -> FleetProcess:
        tmp.mkdir(parents=True)
        port = free_port()
        (tmp / "fleet.toml").write_text(fleet_toml(models, port))
        return FleetProcess(tmp / "fleet.toml", port, tmp / "launcher.log", env=env)

    def ready(self, which: str) -> FleetProcess:
        fleet: FleetProcess = getattr(self, which)
        if which not in self._ready:
            fleet.wait_ready(600)
            self._ready.add(which)
        return fleet

    def stop(self) -> None:
        for fleet in (self.tiny, self.default):
            family = fleet.descendants()
            fleet.stop()
            for p in family:
                with contextlib.suppress(psutil.Error):
                    p.kill()
