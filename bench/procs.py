"""Server processes for the benchmark: start in their own process group, always stop, measure.

Every process is started with `start_new_session=True` and registered; `stop_all()` (called
from `finally`, `atexit` and the SIGTERM handler run.py installs) sends SIGTERM to each group,
waits, then SIGKILLs the group and any descendant that left it. `Monitor` samples a front-end
process (CPU seconds, peak RSS) and its whole process tree while load runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import aiohttp
import psutil

STOP_GRACE = 15.0
_running: list[Server] = []


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process (and everything it spawns), logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n$ {' '.join(self.argv)}\n".encode())
        self._log.flush()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=self.env, cwd=self.cwd, start_new_session=True,
        )
        _running.append(self)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 25) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the group, wait `grace`, SIGKILL whatever is left of the tree."""
        if self.proc is None:
            return
        family: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            family = psutil.Process(self.proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        _, alive = psutil.wait_procs(family, timeout=min(grace, 5))
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        if self._log:
            self._log.close()
            self._log = None
        if self in _running:
            _running.remove(self)


def stop_all() -> None:
    """Stop every server still registered, newest first."""
    for server in reversed(list(_running)):
        with contextlib.suppress(Exception):
            server.stop()


async def wait_http(url: str, server: Server, timeout: float, ok: int = 200, interval: float = 0.02) -> float:
    """Poll `url` until it answers `ok`; seconds since the server's start. Fails if it exits."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode if server.proc else '?'}:\n{server.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with session.get(url) as r:
                    if r.status == ok:
                        return time.monotonic() - server.started_at
            await asyncio.sleep(interval)
    raise RuntimeError(f"{server.name}: {url} did not answer {ok} within {timeout:.0f}s:\n{server.tail()}")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu(procs: Sequence[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


class Monitor:
    """CPU seconds and peak RSS of a front-end process, and CPU of whole systems, over a window."""

    def __init__(self, front_pid: int | None, tree_pids: Sequence[int] = (), interval: float = 0.2) -> None:
        self.front = psutil.Process(front_pid) if front_pid else None
        self.tree_pids = list(tree_pids)
        self.interval = interval
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    def _rss(self) -> int:
        if self.front is None:
            return 0
        with contextlib.suppress(psutil.Error):
            return self.front.memory_info().rss
        return 0

    async def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self._rss())
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._front0 = _cpu([self.front]) if self.front else 0.0
        self._procs = [p for pid in self.tree_pids for p in _tree(pid)]
        self._tree0 = _cpu(self._procs)
        self._self0 = _cpu([psutil.Process()])
        self.rss_before = self._rss()
        self.peak_rss = self.rss_before
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> dict[str, float | None]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        wall = time.perf_counter() - self._t0
        front = _cpu([self.front]) - self._front0 if self.front else None
        tree = _cpu(self._procs) - self._tree0
        client = _cpu([psutil.Process()]) - self._self0
        rss_after = self._rss()
        self.peak_rss = max(self.peak_rss, rss_after)
        mb = 1 << 20
        return {
            "front_cpu_s": round(front, 3) if front is not None else None,
            "front_cpu_pct": round(100 * front / wall, 1) if front is not None and wall else None,
            "front_rss_mb": round(rss_after / mb, 1) if self.front else None,
            "front_peak_rss_mb": round(self.peak_rss / mb, 1) if self.front else None,
            "system_cpu_s": round(tree, 3),
            "system_cpu_pct": round(100 * tree / wall, 1) if wall else None,
            "loadgen_cpu_pct": round(100 * client / wall, 1) if wall else None,
        }
