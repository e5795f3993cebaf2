"""The launcher (fleet.run.launcher.Fleet) running a fleet for weeks, with fake engines: restarts
with backoff (and giving up after max_restarts) while the other models never notice, the gateway's
502 then 503 for an engine that died, reload, status, no process left behind (stopped or
SIGKILLed), a gateway port already taken, and what the launcher's side never imports.

Engines are `tests/fake_engine.py` subprocesses started by the real launcher (`Fleet`), in-process
(the `fake_fleet` fixture) or, for signals, in a process of its own (`run_fleet_script`). The
`fleet` command line's own tests (status, reload, stop through the CLI) are tests/test_cli.py's.
"""

from __future__ import annotations

import asyncio
import io
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from fake_engine import fake_command
from fleets import FAST, ROOT, FakeFleets, fake, fake_config, fleet_ready, free_port, run_fleet_script, wait_until
from owners import NO_RESTARTS, family, kill_all, wait_gone
from rich.console import Console

from fleet.config.load import parse_config
from fleet.lifecycle import EngineState
from fleet.run.launcher import Fleet

S = EngineState

pytestmark = pytest.mark.usefixtures("log_dir")  # engine logs of each test go to its own directory


def complete(url: str, model: str, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3, **kw}, timeout=20)


# --- restarts --------------------------------------------------------------------------------


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


# --- reload and status -----------------------------------------------------------------------


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
        except BaseException as e:  # asserted below
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


def test_reload_with_a_broken_file_changes_nothing(tmp_path: Path) -> None:
    proc, cfg_path, port = run_fleet_script(tmp_path, [fake("one")])
    try:
        cfg_path.write_text("[[models]]\nname = 'x'\n")
        r = httpx.post(f"http://127.0.0.1:{port}/fleet/reload", timeout=30)
        assert r.status_code == 400 and "nothing changed" in r.json()["error"]["message"]
        assert 'field "source"' in r.json()["error"]["message"]
        assert fleet_ready(f"http://127.0.0.1:{port}", ["one"])
    finally:
        proc.terminate()
        proc.wait(30)


def test_status_reports_every_model(fake_fleet: FakeFleets) -> None:
    f = fake_fleet(fake("a"), fake("b", fake_hang_at_start=True), ready=["a"], supervisor=FAST)
    complete(f.url, "a")
    body = httpx.get(f"{f.url}/fleet/status").json()
    rows = {m["model"]: m for m in body["models"]}
    assert rows["a"]["state"] == "ready" and rows["a"]["requests"] == 1 and rows["a"]["uptime_s"] >= 0
    assert rows["b"]["state"] == "starting" and rows["b"]["uptime_s"] is None
    assert set(rows["a"]) >= {"model", "state", "gpus", "port", "pid", "uptime_s", "restarts", "inflight", "tokens_per_s"}
    assert body["gateway"]["pid"] == os.getpid()


def test_the_gateway_reaches_an_engine_it_started_through_a_private_unix_socket_removed_after(
        fake_fleet: FakeFleets) -> None:
    f = fake_fleet(fake("a"))
    owner = f.fleet.owners["a"]
    path = owner.runtime.unix_socket
    assert path is not None and stat.S_ISSOCK(os.stat(path).st_mode)
    folder = os.stat(os.path.dirname(path))
    assert folder.st_uid == os.getuid() and stat.S_IMODE(folder.st_mode) == 0o700  # this user's alone
    for _ in range(3):
        assert complete(f.url, "a").status_code == 200
    engine = psutil.Process(owner.pid)
    assert [c for c in engine.net_connections("tcp") if c.status == psutil.CONN_ESTABLISHED] == []  # none over TCP
    assert len([c for c in engine.net_connections("unix") if c.laddr == path]) >= 2  # listening, and the gateway's
    f.stop()
    assert not os.path.exists(path)


def test_an_engines_unix_socket_is_in_a_folder_of_this_users_alone_or_there_is_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    import tempfile

    from fleet.run.local import engine_socket

    base = Path(tempfile.mkdtemp(prefix="fs-", dir="/tmp"))  # short: a socket's address has room for ~100 bytes
    try:
        runtime = base / "run"
        runtime.mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
        assert engine_socket(5001) == str(runtime / "fleet" / "engine-5001.sock")
        assert stat.S_IMODE((runtime / "fleet").stat().st_mode) == 0o700
        runtime.chmod(0o755)  # a runtime folder others may enter is not used: the temporary directory's is
        (base / "tmp").mkdir()
        monkeypatch.setenv("TMPDIR", str(base / "tmp"))
        monkeypatch.setattr(tempfile, "tempdir", None)  # read $TMPDIR again
        assert engine_socket(5001) == str(base / "tmp" / f"fleet-{os.getuid()}" / "engine-5001.sock")
        (base / "tmp" / f"fleet-{os.getuid()}").chmod(0o777)  # opened to others since: TCP alone
        assert engine_socket(5001) is None
        (base / ("x" * 100)).mkdir()
        monkeypatch.setenv("TMPDIR", str(base / ("x" * 100)))  # too long for a socket's address
        assert engine_socket(5001) is None
    finally:
        shutil.rmtree(base)


# --- stopping: no process left behind -----------------------------------------------------------


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


def test_sigkilled_launcher_leaves_no_engine_behind(tmp_path: Path) -> None:
    proc, _, _ = run_fleet_script(tmp_path, [fake("orphan-candidate")])
    try:
        engines = psutil.Process(proc.pid).children(recursive=True)
        assert engines
        proc.kill()  # SIGKILL: the launcher cannot clean up; the engines must notice on their own
        proc.wait(10)
        _, alive = psutil.wait_procs(engines, timeout=10)
        assert alive == []
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()


# --- the gateway's port, and what the launcher imports --------------------------------------------


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


def test_the_launcher_and_gateway_import_neither_the_engine_stack_nor_unused_heavy_libraries() -> None:
    """The gateway side never imports torch, vllm or Ray; it also skips aiohttp, which once cost a
    quarter of a second of its start, and psutil until engines are watched. (Litestar's default
    pydantic and attrs plugins are imported: ~0.05 s, the price of no private Litestar hook.)"""
    heavy = ("torch", "vllm", "ray", "aiohttp", "psutil")
    code = ("import sys, fleet.cli, fleet.run.launcher, fleet.run.foreground; from fleet.gateway.app import create_app; create_app({}); "
            f"print(' '.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "", f"imported at start: {out.stdout.strip()}"
