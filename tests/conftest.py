"""Shared fixtures: free ports, the tiny model, and fleets run for real (CLI subprocess or in-process)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import CHAT_TEMPLATE, write_tiny_model  # noqa: E402


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v: Any) -> str:
    """A Python value as TOML (enough for fleet files: scalars, lists, flat tables)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def fleet_toml(models: Sequence[dict[str, Any]], port: int, host: str = "127.0.0.1") -> str:
    """A fleet file for `models` (each a dict of ModelConfig fields)."""
    out = [f'[gateway]\nhost = "{host}"\nport = {port}\n']
    for m in models:
        out.append("[[models]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in m.items()))
    return "\n".join(out)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One FLEET_CACHE_DIR for the whole session (the default model is converted once)."""
    path = Path(os.environ.get("FLEET_TEST_CACHE_DIR") or tmp_path_factory.mktemp("fleet-cache"))
    os.environ["FLEET_CACHE_DIR"] = str(path)
    os.environ["FLEET_LOG_DIR"] = str(path / "logs")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama with a real BPE tokenizer and a chat template."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny")


class FleetProcess:
    """`fleet launch` as a real subprocess; stop() sends SIGTERM and waits."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(ROOT / ".venv/bin/fleet"), "launch", "--config", str(config_path), "--no-engine-logs"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def log(self) -> str:
        """What the launcher printed so far."""
        return self.log_path.read_text(errors="replace")

    def states(self) -> dict[str, str]:
        """Each model's engine state, from the gateway's /health."""
        return httpx.get(f"{self.url}/health", timeout=5).json()["models"]

    def wait_ready(self, timeout: float = 300) -> None:
        """Poll /health until every model is ready; fail on a failed engine or launcher exit."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet launch exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                states = self.states()
                if any(s == "failed" for s in states.values()):
                    raise AssertionError(f"an engine failed: {states}\n{self.log()}")
                if states and all(s == "ready" for s in states.values()):
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


@contextlib.contextmanager
def running_fleet(models: Sequence[dict[str, Any]], tmp: Path, ready_timeout: float = 300) -> Iterator[FleetProcess]:
    """Launch a fleet from `models` through the CLI; always stop it (and anything it left) after."""
    port = free_port()
    config = tmp / "fleet.toml"
    config.write_text(fleet_toml(models, port))
    fleet = FleetProcess(config, port, tmp / "launcher.log")
    try:
        fleet.wait_ready(ready_timeout)
        yield fleet
    finally:
        family = fleet.descendants()
        fleet.stop()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()


class InProcessFleet:
    """A `fleet.launcher.Fleet` on its own event loop in a thread, for engines made by `command`."""

    def __init__(self, config: Any, command: Any) -> None:
        from fleet.run.launcher import Fleet

        self.loop = asyncio.new_event_loop()
        self.config = config
        self.url = f"http://{config.gateway.host}:{config.gateway.port}"
        self.error: BaseException | None = None
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def main() -> None:
                self.fleet = Fleet(config, command=command, echo_logs=False)
                ready.set()
                await self.fleet.run()

            try:
                self.loop.run_until_complete(main())
            except BaseException as e:  # noqa: BLE001 - re-raised in stop()
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
                raise self.error or TimeoutError("the gateway did not start in 30 s")
            with contextlib.suppress(concurrent.futures.TimeoutError):
                fut.result(0.05)

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the fleet's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def state(self, name: str) -> str:
        """The lifecycle state of one engine."""
        return self.fleet.engines[name].lifecycle.state.value

    def wait_state(self, name: str, *states: str, timeout: float = 60) -> str:
        """Wait until the engine of `name` is in one of `states` (the lifecycle's own event)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (s := self.state(name)) in states:
                return s
            time.sleep(0.05)
        raise AssertionError(f"{name} still {self.state(name)}, wanted {states}")

    def stop(self, timeout: float = 60) -> None:
        """Stop the fleet and wait for the thread."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.fleet.stop)
            self.thread.join(timeout)
        if self.error:
            raise self.error


# --- real fleets, shared by every end-to-end module ------------------------------------------
# Two fleets start together the first time a test needs one (their engines load in parallel):
# "tiny": two tiny random-weight models with different seeds, routed by name;
# "default": the packaged default model, SmolLM2-135M-Instruct.

TINY = {"dtype": "float32", "max_model_len": 512, "kv_cache_gib": 0.05}


class Fleets:
    """Both fleets, launched at once; each is waited for when first used."""

    def __init__(self, tmp: Path, tiny_a: Path, tiny_b: Path) -> None:
        template = tmp / "chat_template.jinja"  # tiny-b's tokenizer has none: fleet.toml gives it one
        template.write_text(CHAT_TEMPLATE)
        self.tiny = self._launch(tmp / "tiny", [
            {"name": "tiny-a", "source": str(tiny_a), "port": free_port(), **TINY},
            {"name": "tiny-b", "source": str(tiny_b), "port": free_port(), "chat_template": str(template), **TINY},
        ])
        self.default = self._launch(tmp / "default", [
            {"name": "smollm2", "source": "default", "port": free_port(), "max_model_len": 2048},
        ])
        self._ready: set[str] = set()

    @staticmethod
    def _launch(tmp: Path, models: list[dict]) -> FleetProcess:
        tmp.mkdir(parents=True)
        port = free_port()
        (tmp / "fleet.toml").write_text(fleet_toml(models, port))
        return FleetProcess(tmp / "fleet.toml", port, tmp / "launcher.log")

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


@pytest.fixture(scope="session")
def fleets(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[Fleets]:
    other = write_tiny_model(tmp_path_factory.mktemp("tiny-b") / "tiny", seed=1, chat_template=False)
    f = Fleets(tmp_path_factory.mktemp("fleets"), tiny_model, other)
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture(scope="session")
def tiny(fleets: Fleets) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleets.ready("tiny").url + "/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="session")
def default(fleets: Fleets) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleets.ready("default").url + "/v1", api_key="x", max_retries=0)


