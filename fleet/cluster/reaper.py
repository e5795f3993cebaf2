"""`python -m fleet.cluster.reaper HOST_PID ENGINE_PID`: on a node, stops an engine's whole process
tree once its host actor's worker process is gone.

Why it exists: when Ray ends an actor's worker (its job ended: the launcher stopped or was
SIGKILLed; `ray.kill`; the out-of-memory killer), the raylet SIGKILLs the worker's direct children,
the engine among them, before the engine can stop vLLM's own processes (EngineCore and its
workers), which would live on holding memory and GPUs. Nothing in the actor can act after a
SIGKILL, so this watcher lives outside it: it detaches (a second fork, so that it is nobody's child
that Ray would kill), notes the engine's descendants while it runs, and when the host process is
gone sends SIGTERM to the engine's process group and those descendants, then SIGKILL after a
grace period. When the engine's tree ends first (a normal stop), it just exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

import psutil

POLL = 0.2
GRACE = 5.0


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists (not ours to signal)
        pass
    return True


def _signal(pgid: int, tree: dict[int, psutil.Process], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for p in tree.values():
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def watch(host: int, engine: int, *, poll: float = POLL, grace: float = GRACE) -> None:
    """Until the engine's group is gone: if the host process dies first, stop the engine's tree."""
    try:
        watched = psutil.Process(host)
    except psutil.NoSuchProcess:
        watched = None
    tree: dict[int, psutil.Process] = {}
    while _group_alive(engine):
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(engine).children(recursive=True):
                tree.setdefault(p.pid, p)
        if watched is None or not watched.is_running() or watched.status() == psutil.STATUS_ZOMBIE:
            _signal(engine, tree, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (_group_alive(engine) or any(p.is_running() for p in tree.values())):
                time.sleep(poll)
            _signal(engine, tree, signal.SIGKILL)
            return
        time.sleep(poll)


def main(argv: list[str]) -> None:
    host, engine = int(argv[0]), int(argv[1])
    if os.fork():  # the starter's child exits at once: this one is orphaned, not a child of the actor
        os._exit(0)
    watch(host, engine)


if __name__ == "__main__":
    main(sys.argv[1:])
