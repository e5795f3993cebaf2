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
import random
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
CLEAN_ENV = {"FLEET_API_KEYS", "LITELLM_MASTER_KEY", "OPENAI_API_KEY"}  # every system runs without auth
_running: list[Server] = []


# Ports are handed out for servers that bind them later (an engine binds its port once its model is
# loaded, tens of seconds on). They come from below the kernel's ephemeral range, which outgoing
# connections and every bind to port 0 (vLLM's own ZMQ ports among them) draw from, so that nothing
# takes one meanwhile; and never the same one twice in one process. From 20000 up: Ray's workers
# take ports from 10002 to 19999 (the cluster tests run a real Ray cluster).
_given: set[int] = set()
_rng = random.Random()
LOWEST_PORT = 20000


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # the usual Linux default; elsewhere the range is higher still


def _share(low: int, top: int) -> tuple[int, int]:
    """This process's part of [low, top): all of it, or under pytest-xdist the worker's own slice,
    so that two workers never hand out the same port (each remembers only its own)."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if not worker.startswith("gw") or not count.isdigit() or int(count) < 2:
        return low, top
    k, width = int(worker[2:]), (top - low) // int(count)
    return low + k * width, low + (k + 1) * width


def free_ports(n: int = 1) -> int:
    """The first of `n` consecutive loopback ports nothing listens on, none handed out before, all
    below the ephemeral range (where no outgoing connection or port-0 bind can take them)."""
    low, top = _share(LOWEST_PORT, _ephemeral_low())
    top -= n  # the last port of the n within this share
    if top - low < 500:  # an ephemeral range reaching this low: fall back to the kernel's choice
        for _ in range(100):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                first = s.getsockname()[1]
            if first + n <= 65536 and all(_free(first + k) for k in range(1, n)):
                return first
        raise RuntimeError(f"no {n} consecutive free ports")
    for _ in range(1000):
        first = _rng.randrange(low, top)
        ports = range(first, first + n)
        if _given.isdisjoint(ports) and all(_free(p) for p in ports):
            _given.update(ports)
            return first
    raise RuntimeError(f"no {n} consecutive free ports below {top + n}")


def free_port() -> int:
    """A loopback TCP port nothing listens on, kept free for a server that binds it later (free_ports)."""
    return free_ports(1)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Server:
    """One server process (and everything it spawns), logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
        self.env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
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
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - the server's log, closed when it stops
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


def _busy() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


class Monitor:
    """CPU seconds and peak RSS of a front-end process, and CPU of whole systems, over a window.

    The process trees under `tree_pids` are re-read at every sample, so processes spawned during
    the window (vLLM's engine core, say) count too, and one that exits keeps its last reading.
    """

    def __init__(self, front_pid: int | None, tree_pids: Sequence[int] = (), interval: float = 0.2) -> None:
        self.front = psutil.Process(front_pid) if front_pid else None
        self.tree_pids = list(tree_pids)
        self.interval = interval
        self.peak_rss = 0
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None

    def _rss(self) -> int:
        if self.front is None:
            return 0
        with contextlib.suppress(psutil.Error):
            return self.front.memory_info().rss
        return 0

    def _read_tree(self, first: bool = False) -> None:
        for pid in self.tree_pids:
            for p in _tree(pid):
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    cpu = t.user + t.system
                    key = p.pid
                    if key not in self._base:
                        self._base[key] = cpu if first else 0.0
                    self._last[key] = cpu

    async def _sample(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, self._rss())
            self._read_tree()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._front0 = _cpu([self.front]) if self.front else 0.0
        self._read_tree(first=True)
        self._self0 = _cpu([psutil.Process()])
        self._machine0 = _busy()
        self.rss_before = self._rss()
        self.peak_rss = self.rss_before
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> dict[str, float | None]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._read_tree()
        wall = time.perf_counter() - self._t0
        front = _cpu([self.front]) - self._front0 if self.front else None
        tree = sum(self._last[k] - self._base[k] for k in self._last)
        client = _cpu([psutil.Process()]) - self._self0
        machine = _busy() - self._machine0
        other = max(0.0, machine - tree - client)
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
            # Everything else on the machine (other users' processes): noise in every number above.
            "other_cpu_pct": round(100 * other / wall, 1) if wall else None,
        }
