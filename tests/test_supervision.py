"""Running a fleet for weeks, with fake engines: restarts with backoff (and giving up after
max_restarts), reload, status, stop, logs.

Engines are `tests/fake_engine.py` subprocesses started by the real launcher (`Fleet`), in-process
(the `fake_fleet` fixture) or, for signals and the CLI, in a process of its own.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
from conftest import ROOT, FakeFleets, fake_config, fake_launcher_command, free_port, wait_until
from rich.console import Console

FAST = {"restart_backoff": 0.2, "restart_backoff_max": 0.4, "max_restarts": 2, "health_interval": 0.2,
        "stop_grace": 3.0, "drain_timeout": 10.0}


def fake(name: str, **engine_args: Any) -> dict[str, Any]:
    return {"name": name, "source": "fake", "port": free_port(), "engine_args": {"fake_word": name, **engine_args}}


def complete(url: str, model: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3, **kw}, timeout=20)


def test_crashed_engine_restarts_with_backoff_and_other_models_never_notice(fake_fleet: FakeFleets) -> None:
    f = fake_fleet(fake("fragile", fake_crash_after_requests=1), fake("steady"), supervisor=FAST)
    transitions = f.transitions("fragile")
    first_pid = f.fleet.owners["fragile"].pid
    assert complete(f.url, "fragile").status_code == 200
    dying = complete(f.url, "fragile")  # the engine dies holding this request
    assert dying.status_code == 502 and dying.json()["error"]["code"] == "engine_error"
    f.wait_state("fragile", "failed", "restarting", "starting")
    seen: list[int] = []
    while f.state("fragile") != "ready":  # while it restarts: 503 + Retry-After, never a hang
        r = complete(f.url, "fragile")
        seen.append(r.status_code)
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) > 0
        assert complete(f.url, "steady").status_code == 200
    assert 503 in seen and set(seen) <= {200, 503}
    if 200 not in seen:  # the restarted engine crashes on its 2nd request too: send at most one
        assert complete(f.url, "fragile").status_code == 200
    states = transitions.wait(lambda s: s[-1] == "ready" and len(s) > 1, "ready again")
    assert states == ["ready", "failed", "restarting", "starting", "ready"]
    waited = transitions.at[3] - transitions.at[2]  # restarting -> starting: the backoff
    assert waited >= FAST["restart_backoff"] - 0.01, waited
    status = httpx.get(f"{f.url}/fleet/status").json()
    row = next(m for m in status["models"] if m["model"] == "fragile")
    assert row["restarts"] == 1 and row["state"] == "ready" and row["pid"] and row["pid"] != first_pid


def test_engine_that_keeps_failing_stays_failed_after_max_restarts(fake_fleet: FakeFleets) -> None:
    out = io.StringIO()
    f = fake_fleet(fake("broken", fake_exit_at_start=3), ready=[], console=Console(file=out, width=400),
                   supervisor={**FAST, "max_restarts": 2})
    transitions = f.transitions("broken")
    states = transitions.wait(lambda s: s.count("failed") == 3, "three failures")
    states = states[states.index("starting"):]  # recording may begin before the owner task's first step
    assert states == ["starting", "failed", "restarting", "starting", "failed", "restarting", "starting", "failed"]
    wait_until(lambda: "stays failed" in out.getvalue(), "the launcher says it gives up")  # a console line: no event
    engine = f.fleet.owners["broken"]
    assert (f.state("broken"), engine.pid, engine.total_restarts) == ("failed", None, 2)
    r = complete(f.url, "broken")
    assert r.status_code == 503 and "exited with code 3" in r.json()["error"]["message"]


def test_backoff_doubles_up_to_its_cap() -> None:
    from fleet.config.schema import SupervisorConfig
    from fleet.run.owner import backoff

    policy = SupervisorConfig(restart_backoff=1, restart_backoff_max=5)
    assert [backoff(policy, n) for n in range(5)] == [1, 2, 4, 5, 5]


def test_reload_adds_removes_and_changes_models_while_an_untouched_model_streams(fake_fleet: FakeFleets) -> None:
    keep, gone, changed = fake("keep", fake_token_delay=0.05), fake("gone"), fake("changed")
    f = fake_fleet(keep, gone, changed, supervisor=FAST)
    sdk = openai.OpenAI(base_url=f.url + "/v1", api_key="x", max_retries=0)
    texts: list[str] = []
    errors: list[BaseException] = []

    def stream_keep() -> None:
        try:
            for chunk in sdk.completions.create(model="keep", prompt="a", max_tokens=40, stream=True):
                texts.append(chunk.choices[0].text)
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    reader = threading.Thread(target=stream_keep)
    reader.start()
    wait_until(lambda: len(texts) >= 2, "the stream from the untouched model started")
    new = fake_config(keep, {**changed, "engine_args": {"fake_word": "CHANGED"}}, fake("added"), supervisor=FAST)
    new = new.model_copy(update={"gateway": f.config.gateway})
    report = f.call(f.fleet.reload(new))
    assert (report.added, report.removed, report.changed, report.unchanged) == (["added"], ["gone"], ["changed"], ["keep"])
    reader.join(30)
    assert errors == [] and len(texts) == 40  # the untouched model never noticed
    assert complete(f.url, "gone").status_code == 404
    f.wait_state("added", "ready")
    f.wait_state("changed", "ready")
    assert "CHANGED" in complete(f.url, "changed").json()["choices"][0]["text"]
    assert complete(f.url, "added").status_code == 200


def test_reload_keeps_the_engines_where_they_run_and_says_a_new_cluster_table_needs_a_restart(fake_fleet: FakeFleets) -> None:
    a = fake("a")
    f = fake_fleet(a, supervisor=FAST)
    new = fake_config(a, supervisor=FAST, cluster={"address": "10.0.0.1:6379"})
    new = new.model_copy(update={"gateway": f.config.gateway})
    report = f.call(f.fleet.reload(new))
    assert "[cluster] changed: restart the fleet to apply it" in report.warnings
    assert f.fleet.config.cluster is None and f.fleet.runtimes.on_this_machine  # still this machine's engines


def test_status_reports_every_model(fake_fleet: FakeFleets) -> None:
    f = fake_fleet(fake("a"), fake("b", fake_hang_at_start=True), ready=["a"], supervisor=FAST)
    complete(f.url, "a")
    body = httpx.get(f"{f.url}/fleet/status").json()
    rows = {m["model"]: m for m in body["models"]}
    assert rows["a"]["state"] == "ready" and rows["a"]["requests"] == 1 and rows["a"]["uptime_s"] >= 0
    assert rows["b"]["state"] == "starting" and rows["b"]["uptime_s"] is None
    assert set(rows["a"]) >= {"model", "state", "gpus", "port", "pid", "uptime_s", "restarts", "inflight", "tokens_per_s"}
    assert body["gateway"]["pid"] == os.getpid()


def run_fleet_script(tmp_path: Path, models: list[dict[str, Any]]) -> tuple[subprocess.Popen, Path, int]:
    """A launcher in its own process (fleet.run.foreground.launch with fake engines), as `fleet launch` runs it."""
    port = free_port()
    cfg_path = tmp_path / "fleet.toml"
    from conftest import fleet_toml

    cfg_path.write_text(fleet_toml(models, port))
    proc = subprocess.Popen(fake_launcher_command(tmp_path, cfg_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "FLEET_LOG_DIR": str(tmp_path / "logs")})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: _ready(url, [m["name"] for m in models]), "the fleet is ready")
    return proc, cfg_path, port


def _ready(url: str, names: list[str]) -> bool:
    try:
        states = httpx.get(f"{url}/health", timeout=1).json()["models"]
    except httpx.HTTPError:
        return False
    return all(states.get(n) == "ready" for n in names)


def test_sigkilled_launcher_leaves_no_engine_behind(tmp_path: Path) -> None:
    proc, _, _ = run_fleet_script(tmp_path, [fake("orphan-candidate")])
    try:
        engines = psutil.Process(proc.pid).children(recursive=True)
        assert engines
        proc.kill()  # SIGKILL: the launcher cannot clean up; the engines must notice on their own
        proc.wait(10)
        gone, alive = psutil.wait_procs(engines, timeout=10)
        assert alive == []
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_cli_status_reload_stop_and_sighup(tmp_path: Path) -> None:
    models = [fake("one")]
    proc, cfg_path, port = run_fleet_script(tmp_path, models)
    fleet = [str(ROOT / ".venv/bin/fleet")]
    try:
        out = subprocess.run([*fleet, "status", "--config", str(cfg_path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "one" in out.stdout and "ready" in out.stdout
        js = subprocess.run([*fleet, "status", "--json", "--config", str(cfg_path)], capture_output=True, text=True)
        assert '"model": "one"' in js.stdout
        from conftest import fleet_toml

        cfg_path.write_text(fleet_toml([*models, fake("two")], port))
        out = subprocess.run([*fleet, "reload", "--config", str(cfg_path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "added: two" in out.stdout
        wait_until(lambda: _ready(f"http://127.0.0.1:{port}", ["one", "two"]), "two is ready")
        cfg_path.write_text(fleet_toml(models, port))
        proc.send_signal(signal.SIGHUP)  # SIGHUP reloads too: two goes away
        wait_until(lambda: "two" not in httpx.get(f"http://127.0.0.1:{port}/health").json()["models"], "two removed")
        logs = subprocess.run([*fleet, "logs", "one", "-n", "5"], capture_output=True, text=True,
                              env={**os.environ, "FLEET_LOG_DIR": str(tmp_path / "logs")})
        assert logs.returncode == 0 and "fake engine one" in logs.stdout
        engines = psutil.Process(proc.pid).children(recursive=True)
        out = subprocess.run([*fleet, "stop", "--config", str(cfg_path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0
        assert proc.wait(30) == 0
        assert psutil.wait_procs(engines, timeout=10)[1] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.Process().children(recursive=True):
            p.kill()


def test_reload_with_a_broken_file_changes_nothing(tmp_path: Path) -> None:
    proc, cfg_path, port = run_fleet_script(tmp_path, [fake("one")])
    try:
        cfg_path.write_text("[[models]]\nname = 'x'\n")
        r = httpx.post(f"http://127.0.0.1:{port}/fleet/reload", timeout=30)
        assert r.status_code == 400 and "nothing changed" in r.json()["error"]["message"]
        assert 'field "source"' in r.json()["error"]["message"]
        assert _ready(f"http://127.0.0.1:{port}", ["one"])
    finally:
        proc.terminate()
        proc.wait(30)
