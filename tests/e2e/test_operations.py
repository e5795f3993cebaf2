"""Operating a real fleet (vLLM CPU engines, the real CLI): crash -> restart, reload, stop,
and the status page watching it all in a real browser (Debian's Chromium through Playwright).

The tests run in file order against one fleet of tiny models; a client keeps streaming from
the untouched model the whole time and must never see an error. The page is opened once, before
the crash, and never reloaded: what it shows comes over its one event stream.
"""

from __future__ import annotations

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
from browser import Browser
from fleets import ROOT, TINY, FleetProcess, fleet_toml, free_port, running_fleet

ADMIN = "ops-admin"
SUPERVISOR = f"[supervisor]\nrestart_backoff = 0.5\nhealth_interval = 0.5\n\n[ui]\nadmin_key = \"{ADMIN}\"\n\n"


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
            except Exception as e:  # asserted by the tests
                self.errors.append(e)
            self._stop.wait(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[FleetProcess]:
    models = [{"name": n, "source": str(tiny_model), "port": free_port(), **TINY} for n in ("ops-a", "ops-b")]
    with running_fleet(models, tmp_path_factory.mktemp("ops"), ready_timeout=600, tables=SUPERVISOR) as fleet:
        fleet.models = models  # type: ignore[attr-defined]
        yield fleet


@pytest.fixture(scope="module")
def page(ops: FleetProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    browser = Browser(ops.url, tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield browser
    finally:
        browser.close()


def engine_row(page: Browser, engine: str) -> dict[str, str]:
    """What the page's engines table shows for one engine, by column."""
    cells: dict[str, str] = page.page.evaluate("""(name) => {
        const row = document.querySelector(`#engines tr[data-engine="${name}"]`);
        if (!row) return {};
        const heads = [...document.querySelectorAll('#engines thead th')].map((th) => th.textContent);
        return Object.fromEntries([...row.cells].map((td, i) => [heads[i], td.textContent]));
    }""", engine)
    return cells


def shown_changes(page: Browser, engine: str) -> list[str]:
    """The states the page's state-change table shows an engine went to, oldest first."""
    went: list[str] = page.page.evaluate("""(name) => [...document.querySelectorAll(
        `#changes tbody tr[data-engine="${name}"]`)].map((tr) => tr.dataset.to).reverse()""", engine)
    return went


def status(fleet: FleetProcess) -> dict[str, dict]:
    return {m["model"]: m for m in httpx.get(f"{fleet.url}/fleet/status", timeout=10).json()["models"]}


def wait_for(check, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(0.25)


def test_the_status_page_loads_without_console_errors_and_shows_every_engine(ops: FleetProcess, page: Browser) -> None:
    page.page.wait_for_selector("#connection[data-state=live]")
    page.page.wait_for_selector('#engines tr[data-engine="ops-b"]')
    for name in ("ops-a", "ops-b"):
        row = engine_row(page, name)
        assert row["Model"] == name and row["State"].startswith("ready") and row["PID"] == str(status(ops)[name]["pid"])
        assert row["Where"] == f"CPU · 127.0.0.1:{status(ops)[name]['port']}"
    assert shown_changes(page, "ops-a")[-2:] == ["starting", "ready"]
    assert '[ui]\nadmin_key = "********"' in page.page.inner_text("#config")
    assert page.errors == []


def test_each_cpu_engine_on_its_own_cores_runs_its_model_worker_in_its_engine_core(ops: FleetProcess) -> None:
    """fleet binds each of the two CPU engines to its own core, so vLLM's worker runs inside the
    EngineCore (engine/args.py: worker_in_engine_core): no worker process of its own."""
    for name in ("ops-a", "ops-b"):
        engine = psutil.Process(status(ops)[name]["pid"])
        names = [p.name() for p in engine.children(recursive=True)]  # also multiprocessing's resource tracker
        assert names.count("VLLM::EngineCore") == 1 and not [n for n in names if "Worker" in n], (name, names)
        assert engine.cpu_affinity() == [int(c) for c in engine.environ()["VLLM_CPU_OMP_THREADS_BIND"].split(",")]


def test_killed_engine_restarts_and_other_models_see_no_error(ops: FleetProcess, page: Browser) -> None:
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
    # the open page showed it all as it happened, without being reloaded
    page.wait_for("""() => {
        const row = document.querySelector('#engines tr[data-engine="ops-a"]');
        return row && row.cells[6].textContent === "1" && row.cells[2].textContent.startsWith("ready");
    }""")
    went = shown_changes(page, "ops-a")
    assert went[went.index("failed"):] == ["failed", "restarting", "starting", "ready"]
    assert engine_row(page, "ops-a")["PID"] == str(row["pid"])
    assert page.page.evaluate("window.notReloaded") is True


def test_a_request_appears_in_the_status_page_s_recent_list(ops: FleetProcess, page: Browser) -> None:
    listed = """() => [...document.querySelectorAll('#requests tbody tr[data-model="ops-a"]')]
        .filter((tr) => tr.cells[4].textContent === "200" && tr.cells[6].textContent === "7").length"""
    before = page.page.evaluate(listed)
    with openai.OpenAI(base_url=ops.url + "/v1", api_key="x", max_retries=0) as sdk:
        answer = sdk.completions.create(model="ops-a", prompt="Hello", max_tokens=7, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 7
    page.wait_for(f"() => ({listed})() === {before + 1}")
    row = page.page.evaluate("""() => [...document.querySelector('#requests tbody tr[data-model="ops-a"]').cells]
        .map((td) => td.textContent)""")
    assert row[2] == "ops-a" and row[3] == "completions" and row[5] == str(answer.usage.prompt_tokens)


def test_restart_from_the_page_needs_the_admin_key_and_the_log_view_follows(ops: FleetProcess, page: Browser) -> None:
    p = page.page
    p.select_option("#log-engine", "ops-a")
    assert p.is_checked("#follow")
    victim = status(ops)["ops-a"]["pid"]
    p.click('#engines tr[data-engine="ops-a"] button:has-text("Restart")')
    page.wait_for("""() => document.querySelector('#message').textContent.includes('refused (401)')""")
    assert status(ops)["ops-a"]["pid"] == victim and status(ops)["ops-a"]["state"] == "ready"
    p.fill("#key", ADMIN)
    p.press("#key", "Enter")
    p.wait_for_selector("#connection[data-state=live]")
    lines_before = p.inner_text("#log").count("\n")
    p.click('#engines tr[data-engine="ops-a"] button:has-text("Restart")')
    page.wait_for("""() => document.querySelector('#message').textContent === 'restart ops-a: done'""")
    # stopped, and started anew: a new engine process loads (the next test's reload replaces it, so
    # the suite does not wait for this load too; readiness after a restart: tests/gateway/ui/test_status_page.py)
    page.wait_for(f"""() => {{
        const row = document.querySelector('#engines tr[data-engine="ops-a"]');
        return row.cells[2].textContent.startsWith("starting") && !["{victim}", "–"].includes(row.cells[4].textContent);
    }}""", timeout=120)
    went = shown_changes(page, "ops-a")
    assert went[-2:] == ["stopping", "starting"]
    new_pid = status(ops)["ops-a"]["pid"]
    assert new_pid not in (None, victim) and engine_row(page, "ops-a")["PID"] == str(new_pid)
    wait_for(lambda: gone(victim), "the old engine is gone", 30)
    # the log view followed: the launcher's lines about the restart, then the new engine's own
    page.wait_for(f"""() => document.querySelector('#log').textContent.split('\\n').length > {lines_before + 3}""")
    log = p.inner_text("#log")
    assert log.index("fleet: restarting, as asked") < log.index(f"fleet: starting (pid {new_pid}")
    assert p.evaluate("(() => { const l = document.querySelector('#log'); "
                      "return l.scrollHeight - l.scrollTop - l.clientHeight < 2; })()")
    assert p.evaluate("window.notReloaded") is True
    # the only console errors: the refused restart's answer, as Chromium logs any 4xx
    assert [e for e in page.errors if "401" not in e] == []
    if shot := os.environ.get("FLEET_UI_SCREENSHOT"):
        p.set_viewport_size({"width": 1400, "height": 900})
        p.screenshot(path=shot, full_page=True)


def reload(config: Path, models: list[dict], port: int) -> str:
    config.write_text(fleet_toml(models, port, tables=SUPERVISOR))
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "reload", "--config", str(config)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reload_adds_changes_and_removes_models_while_a_client_streams_from_another(
    ops: FleetProcess, tiny_model: Path, page: Browser
) -> None:
    steady = Steady(ops.url, "ops-b")
    try:
        config = Path(ops.proc.args[3])
        a, b = ops.models  # type: ignore[attr-defined]
        changed = {**a, "max_model_len": 256}
        added = {"name": "ops-c", "source": str(tiny_model), "port": free_port(), **TINY}
        out = reload(config, [changed, b, added], ops.port)
        assert "added: ops-c" in out and "changed: ops-a" in out and "unchanged: ops-b" in out
        page.page.wait_for_selector('#engines tr[data-engine="ops-c"]')  # the open page follows the reload
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
        page.page.wait_for_selector('#engines tr[data-engine="ops-c"]', state="detached")
    finally:
        steady.stop()
    assert steady.errors == [] and steady.streams > 0


def test_stop_leaves_no_process(ops: FleetProcess, cache_dir: Path) -> None:
    family = ops.descendants()
    assert len(family) >= 4  # two engines, each with vLLM's own processes
    logs = {log: log.stat().st_size for log in (cache_dir / "logs").glob("ops-*.log")}
    began = time.monotonic()
    out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "stop", "--port", str(ops.port)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    assert ops.proc.wait(120) == 0
    # each engine ends as soon as vLLM has shut down: no wait for the resource tracker (which ignores
    # SIGTERM) nor the interpreter's teardown of torch; both engines took 11-15 s before
    assert time.monotonic() - began < 10  # ~2 s, ~7 s when vLLM force-kills a stalled EngineCore
    # the EngineCore got the group's SIGTERM too: vLLM's "engine core died" report is not logged then
    stopping = {log.name: log.read_bytes()[size:] for log, size in logs.items()}
    assert stopping and not [name for name, text in stopping.items() if b"EngineDeadError" in text], stopping
    assert psutil.wait_procs(family, timeout=30)[1] == []


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
