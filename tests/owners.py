"""Engine owners over fake engine processes of this machine, and the process trees they leave:
helpers of the tests in tests/run/ (fleet.run.owner, fleet.run.process, fleet.run.launcher)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

import psutil
from fleets import free_port

from fleet.config.model import ModelConfig


def local_owner(cfg: Any, command: Any, *, console: Any = None, policy: Any = None, token: str | None = None,
                engine_timeout: float = 300.0) -> Any:
    """An engine owner (fleet.run.owner.EngineOwner) over a process of this machine started by
    `command` (a fake engine's, or the real one), its output not echoed."""
    from fleet.run.local import LocalProcess
    from fleet.run.owner import EngineOwner

    runtime = LocalProcess(cfg, command=command, echo_logs=False, console=console, token=token)
    return EngineOwner(cfg, runtime, console=console, policy=policy, token=token, engine_timeout=engine_timeout)


def model(name: str = "m", *, start_timeout: float = 60, **engine_args: Any) -> ModelConfig:
    """A fake engine's model on a free port; `engine_args` tell the fake how to behave."""
    return ModelConfig(name=name, source="fake", port=free_port(), start_timeout=start_timeout, engine_args=engine_args)


# Tests of failures want them to stay failed; a restart test asks for restarts.
NO_RESTARTS = {"max_restarts": 0, "stop_grace": 5.0}


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
