"""The `fleet` command line (fleet.cli) run as users run it, against fake engines: `fleet launch`
refusing a bad fleet file (naming the file, the model and the field) or a gateway port already
taken, and `fleet status`, `fleet reload`, SIGHUP, `fleet logs` and `fleet stop` on a running
fleet. (`fleet check` is tested with what it checks: tests/machine/test_check.py, and beside the
exposure, cluster and replica rules.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fleets import ROOT, fake, fleet_ready, fleet_toml, free_port, run_fleet_script, wait_until

pytestmark = pytest.mark.usefixtures("log_dir")  # engine logs of each test go to its own directory


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


def test_cli_status_reload_stop_and_sighup(tmp_path: Path) -> None:
    models = [fake("one")]
    proc, cfg_path, port = run_fleet_script(tmp_path, models)
    fleet = [str(ROOT / ".venv/bin/fleet")]
    try:
        out = subprocess.run([*fleet, "status", "--config", str(cfg_path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "one" in out.stdout and "ready" in out.stdout
        js = subprocess.run([*fleet, "status", "--json", "--config", str(cfg_path)], capture_output=True, text=True)
        assert '"model": "one"' in js.stdout
        cfg_path.write_text(fleet_toml([*models, fake("two")], port))
        out = subprocess.run([*fleet, "reload", "--config", str(cfg_path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "added: two" in out.stdout
        wait_until(lambda: fleet_ready(f"http://127.0.0.1:{port}", ["one", "two"]), "two is ready")
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
