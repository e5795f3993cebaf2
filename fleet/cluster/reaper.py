"""`python -m fleet.cluster.reaper HOST_PID ENGINE_PID`: on a node, stops an engine's whole process
tree once its host actor's worker process is gone.

Why it exists: when Ray ends an actor's worker (its job ended: the launcher stopped or was
SIGKILLed; `ray.kill`; the out-of-memory killer), the raylet SIGKILLs the worker's direct children,
the engine among them, before the engine can stop vLLM's own processes (EngineCore and its
workers), which would live on holding memory and GPUs. Nothing in the actor can act after a
SIGKILL, so this watcher lives outside it: it detaches (a second fork, so that it is nobody's child
that Ray would kill), notes the engine's descendants while it runs, and when the host process is
gone sends SIGTERM to the engine's process group and those descendants, then SIGKILL after a
grace period (the same stop as every engine's: fleet.run.process.Tree). When the engine's tree
ends first (a normal stop), it just exits.
"""

from __future__ import annotations

import os
import sys
import time

import psutil

from fleet.run.process import STOP_GRACE, Tree

POLL = 0.2


def watch(host: int, engine: int, *, poll: float = POLL, grace: float = STOP_GRACE) -> None:
    """Until the engine's group is gone: if the host process dies first, stop the engine's tree
    (process.Tree, as every engine stop: SIGTERM, then SIGKILL after `grace`)."""
    try:
        watched = psutil.Process(host)
    except psutil.NoSuchProcess:
        watched = None
    tree = Tree(engine)
    while tree.group_alive():
        tree.note(engine)
        tree.errors.clear()  # a walk that failed is tried again at the next poll
        if watched is None or not watched.is_running() or watched.status() == psutil.STATUS_ZOMBIE:
            tree.stop_blocking(grace, poll)
            return
        time.sleep(poll)


def main(argv: list[str]) -> None:
    host, engine = int(argv[0]), int(argv[1])
    if os.fork():  # the starter's child exits at once: this one is orphaned, not a child of the actor
        os._exit(0)
    watch(host, engine)


if __name__ == "__main__":
    main(sys.argv[1:])
