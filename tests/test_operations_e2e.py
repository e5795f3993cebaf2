"""Operating a real fleet (vLLM CPU engines, the real CLI): crash -> restart, reload, SIGKILL, stop.

The tests run in file order against one fleet of tiny models; a client keeps streaming from
the untouched model the whole time and must never see an error.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from conftest import ROOT, TINY, FleetProcess, fleet_toml, free_port

pytestmark = pytest.mark.e2e
SUPERVISOR = "[supervisor]\nrestart_backoff = 0.5\nhealth_interval = 0.5\n\n"


class Steady:
    """A client that streams from one model in a loop and records every error.

    It thinks for `pause` seconds between streams. Back to back, it kept the engine's vLLM
    worker busy-looping (vLLM's CPU worker spins for 1 s after each step) on the core fleet
    binds that model to; every process of a restarting engine pins itself to each core in turn
    for a moment while torch starts (a CPU probe), and on that core it then waited behind the
    spinning worker for minutes: the restart "hung" before its first log line. With pauses
    longer than the spin, the worker sleeps between streams.
    """

    def __init__(self, url: str, model: str, pause: float = 2.0) -> None:
        self.sdk = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        self.model, self.errors, self.streams, self.pause = model, [], 0, pause
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                chunks = list(self.sdk.completions.create(model=self.model, prompt="Hello", max_tokens=8, stream=True,
                                                          extra_body={"ignore_eos": True}))
                assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 1
                self.streams += 1
            except Exception as e:  # noqa: BLE001 - asserted by the tests
                self.errors.append(e)
            self._stop.wait(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[FleetProcess]:
    tmp = tmp_path_factory.mktemp("ops")
    port = free_port()
    models = [{"name": n, "source": str(tiny_model), "port": free_port(), **TINY} for n in ("ops-a", "ops-b")]
    (tmp / "fleet.toml").write_text(SUPERVISOR + fleet_toml(models, port))
    fleet = FleetProcess(tmp / "fleet.toml", port, tmp / "launcher.log")
    fleet.models = models  # type: ignore[attr-defined]
    family: list[psutil.Process] = []
    try:
        fleet.wait_ready(600)
        family = fleet.descendants()
        yield fleet
    finally:
        fleet.stop()
        for p in family + fleet.descendants():
            with contextlib.suppress(psutil.Error):
                p.kill()


def status(fleet: FleetProcess) -> dict[str, dict]:
    return {m["model"]: m for m in httpx.get(f"{fleet.url}/fleet/status", timeout=10).json()["models"]}


def wait_for(check, what: str, timeout: float = 300) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(0.25)


def test_killed_engine_restarts_and_other_models_see_no_error(ops: FleetProcess) -> None:
    steady = Steady(ops.url, "ops-b")
    try:
        wait_for(lambda: steady.streams >= 2, "the steady client is streaming")
        victim = status(ops)["ops-a"]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: status(ops)["ops-a"]["state"] != "ready", "the launcher noticed the crash", 30)
        r = httpx.post(f"{ops.url}/v1/completions", json={"model": "ops-a", "prompt": "x"}, timeout=30)
        assert r.status_code == 503 and "retry-after" in r.headers
        wait_for(lambda: status(ops)["ops-a"]["state"] == "ready", "ops-a restarted")
        row = status(ops)["ops-a"]
        assert row["restarts"] == 1 and row["pid"] != victim
        assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
        ok = httpx.post(f"{ops.url}/v1/completions", json={"model": "ops-a", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert ok.status_code == 200
    finally:
        steady.stop()
    assert steady.errors == [] and steady.streams > 2


def reload(config: Path, models: list[dict], port: int) -> str:
    config.write_text(SUPERVISOR + fleet_toml(models, port))
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "reload", "--config", str(config)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reload_adds_changes_and_removes_models_while_a_client_streams_from_another(
    ops: FleetProcess, tiny_model: Path
) -> None:
    steady = Steady(ops.url, "ops-b")
    try:
        config = Path(ops.proc.args[3])
        a, b = ops.models  # type: ignore[attr-defined]
        changed = {**a, "max_model_len": 256}
        added = {"name": "ops-c", "source": str(tiny_model), "port": free_port(), **TINY}
        out = reload(config, [changed, b, added], ops.port)
        assert "added: ops-c" in out and "changed: ops-a" in out and "unchanged: ops-b" in out
        wait_for(lambda: all(status(ops).get(n, {}).get("state") == "ready" for n in ("ops-a", "ops-c")),
                 "ops-a restarted with its new settings and ops-c started")
        long = httpx.post(f"{ops.url}/v1/completions", json={"model": "ops-a", "prompt": [5] * 300, "max_tokens": 2},
                          timeout=30)
        assert long.status_code == 400 and long.json()["error"]["param"] == "prompt"  # the new 256-token context
        r = httpx.post(f"{ops.url}/v1/completions", json={"model": "ops-c", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        out = reload(config, [changed, b], ops.port)
        assert "removed: ops-c" in out
        gone = httpx.post(f"{ops.url}/v1/completions", json={"model": "ops-c", "prompt": "x"}, timeout=30)
        assert gone.status_code == 404
    finally:
        steady.stop()
    assert steady.errors == [] and steady.streams > 0


def test_stop_leaves_no_process(ops: FleetProcess) -> None:
    family = ops.descendants()
    assert len(family) >= 4  # two engines, each with vLLM's own processes
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "stop", "--port", str(ops.port)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    assert ops.proc.wait(120) == 0
    assert psutil.wait_procs(family, timeout=30)[1] == []


def test_sigkilled_launcher_takes_its_real_engines_with_it(tmp_path: Path, tiny_model: Path) -> None:
    port = free_port()
    (tmp_path / "fleet.toml").write_text(
        fleet_toml([{"name": "lonely", "source": str(tiny_model), "port": free_port(), **TINY}], port))
    fleet = FleetProcess(tmp_path / "fleet.toml", port, tmp_path / "launcher.log")
    family: list[psutil.Process] = []
    try:
        fleet.wait_ready(600)
        family = fleet.descendants()
        fleet.proc.kill()
        fleet.proc.wait(10)
        assert psutil.wait_procs(family, timeout=60)[1] == []
    finally:
        fleet.kill()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
