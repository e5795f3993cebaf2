"""Process mechanics shared by the launcher and the engines: signals, process trees, parent death.

No torch or vllm here: the gateway side imports this module too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator

import psutil
import uvicorn

STOP_GRACE = 15.0


class SignalFreeServer(uvicorn.Server):
    """uvicorn without its own signal handling: the process that runs it owns SIGINT/SIGTERM.

    (uvicorn re-raises a captured SIGTERM once it has shut down, which would kill the process
    before its own clean-up ran.)
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of a process."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def reap_children(grace: float = 5.0) -> None:
    """Terminate this process's descendants (vLLM's helpers), killing those still alive after `grace`."""
    family = descendants(os.getpid())
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(family, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


async def stop_process_tree(proc: asyncio.subprocess.Process, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group, wait `grace` seconds, then SIGKILL whatever is left of the tree."""
    family = descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in family:  # descendants that left the group
        with contextlib.suppress(psutil.Error):
            p.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except asyncio.TimeoutError:
        pass
    family += descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    await proc.wait()
    await asyncio.get_running_loop().run_in_executor(None, lambda: psutil.wait_procs(family, timeout=grace))
