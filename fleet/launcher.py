"""`fleet launch`: start every engine at once, show their progress, serve the gateway, stop cleanly.

Each engine is a child process in its own process group (vLLM spawns helpers of its own);
stopping sends SIGTERM to the group, waits a grace period, then SIGKILLs the group and any
descendant that left it. Engines also ask the kernel for SIGTERM when the launcher dies, so
not even a SIGKILLed launcher leaves them behind.

One task per engine (`EngineProcess.run`) owns that engine's `Lifecycle`; everything else
only asks it to stop. Signal handlers only set an event; the main coroutine acts on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import psutil
import uvicorn
from rich.console import Console
from rich.markup import escape

from fleet.app import create_app
from fleet.client import EngineClient
from fleet.config import FleetConfig, ModelConfig
from fleet.lifecycle import EngineState, Lifecycle
from fleet.models import cache_dir
from fleet.routing import Backend

EngineCommand = Callable[[ModelConfig], Sequence[str]]
STOP_GRACE = 15.0
HEALTH_INTERVAL = 0.25
LOG_TAIL = 40


def engine_command(cfg: ModelConfig) -> list[str]:
    """The real engine: `python -m fleet.engine` with the model's settings."""
    return [sys.executable, "-m", "fleet.engine", "--model-json", cfg.model_dump_json()]


def log_dir() -> Path:
    """Where per-model engine logs go: $FLEET_LOG_DIR, else <cache>/logs."""
    return Path(os.environ.get("FLEET_LOG_DIR") or cache_dir() / "logs")


def cpu_bindings(models: Sequence[ModelConfig], cores: Sequence[int]) -> dict[str, str]:
    """Disjoint core sets for several CPU engines (vLLM would pin every one to the same cores)."""
    cpu = [m for m in models if m.on_cpu]
    if len(cpu) < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return {}
    cores = sorted(cores)
    share = max(1, len(cores) // len(cpu))
    bindings = {}
    for i, m in enumerate(cpu):
        mine = cores[i * share:(i + 1) * share] if len(cores) >= len(cpu) else [cores[i % len(cores)]]
        bindings[m.name] = ",".join(map(str, mine))
    return bindings


class EngineProcess:
    """One model's engine process and the single task that owns its lifecycle."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        command: EngineCommand = engine_command,
        env: dict[str, str] | None = None,
        console: Console | None = None,
        echo_logs: bool = True,
    ) -> None:
        self.cfg = cfg
        self.lifecycle = Lifecycle(cfg.name)
        self.client = EngineClient(cfg.name, f"http://{_connect_host(cfg.host)}:{cfg.port}")
        self.command = command
        self.env = env or {}
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.echo_logs = echo_logs
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self._stop = asyncio.Event()
        self._log_file: IO[str] | None = None

    @property
    def pid(self) -> int | None:
        """The engine's process id while it runs."""
        return self.proc.pid if self.proc and self.proc.returncode is None else None

    def request_stop(self) -> None:
        """Ask the owner task to stop the engine."""
        self._stop.set()

    async def run(self) -> None:
        """Start the engine, wait until ready, watch it; stop it when asked."""
        try:
            if await self._start():
                stop = asyncio.create_task(self._stop.wait())
                ready = asyncio.create_task(self._wait_ready())
                await asyncio.wait({stop, ready}, return_when=asyncio.FIRST_COMPLETED)
                if not stop.done() and self.lifecycle.state is EngineState.READY:
                    watch = asyncio.create_task(self._watch_exit())
                    await asyncio.wait({stop, watch}, return_when=asyncio.FIRST_COMPLETED)
                    watch.cancel()
                ready.cancel()
            await self._stop.wait()
        finally:
            await self._terminate()

    async def _start(self) -> bool:
        self.lifecycle.to(EngineState.STARTING)
        path = log_dir() / f"{self.cfg.name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(path, "a", buffering=1)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.cfg.gpus))
        self.started_at = time.monotonic()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(self.cfg),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            self._fail(f"could not start the engine process: {e}")
            return False
        self._reader = asyncio.create_task(self._read_output(self.proc))
        where = "CPU" if self.cfg.on_cpu else f"GPUs {self.cfg.gpus}"
        self.say(f"starting (pid {self.proc.pid}, {where}, port {self.cfg.port}, log {path})")
        return True

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.tail.append(line)
            if self._log_file:
                self._log_file.write(line + "\n")
            if self.echo_logs:
                self.console.print(f"[dim]{escape(self.cfg.name)} |[/dim] {escape(line)}", highlight=False, soft_wrap=True)

    async def _wait_ready(self) -> None:
        """Poll /health until 200; fail at once if the process exits, or at the start timeout."""
        assert self.proc is not None
        deadline = self.started_at + self.cfg.start_timeout
        exited = asyncio.create_task(self.proc.wait())
        try:
            while time.monotonic() < deadline:
                if exited.done():
                    await self._reader
                    self._fail(f"exited with code {self.proc.returncode} before it was ready")
                    return
                if await self.client.healthy(timeout=1.0):
                    self.lifecycle.to(EngineState.READY)
                    self.say(f"[green]ready[/green] in {time.monotonic() - self.started_at:.1f}s on {self.cfg.host}:{self.cfg.port}")
                    return
                await asyncio.wait({exited}, timeout=HEALTH_INTERVAL)
            self._fail(f"not ready after {self.cfg.start_timeout:.0f}s (start_timeout)")
        finally:
            if not exited.done():
                exited.cancel()

    async def _watch_exit(self) -> None:
        assert self.proc is not None
        await self.proc.wait()
        await self._reader
        self._fail(f"crashed (exit code {self.proc.returncode})")

    def _fail(self, reason: str) -> None:
        if self.lifecycle.state in (EngineState.STARTING, EngineState.READY):
            self.lifecycle.to(EngineState.FAILED, reason)
            last = "\n".join(f"    {escape(line)}" for line in list(self.tail)[-15:])
            self.say(f"[red]failed[/red]: {escape(reason)}; last log lines:\n{last}")

    async def _terminate(self) -> None:
        if self.lifecycle.state is EngineState.STOPPED:
            return
        self.lifecycle.to(EngineState.STOPPING)
        if self.proc is not None:
            await stop_process_tree(self.proc)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)
        await self.client.close()
        if self._log_file:
            self._log_file.close()
        self.lifecycle.to(EngineState.STOPPED)
        self.say("stopped")

    def say(self, message: str) -> None:
        """A launcher status line about this engine."""
        self.console.print(f"[bold]fleet[/bold] {escape(self.cfg.name)}: {message}", highlight=False)


async def stop_process_tree(proc: asyncio.subprocess.Process, grace: float = STOP_GRACE) -> None:
    """SIGTERM the process group, wait `grace` seconds, then SIGKILL whatever is left of the tree."""
    family = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for p in family:  # descendants that left the group
        with contextlib.suppress(psutil.Error):
            p.terminate()
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except asyncio.TimeoutError:
        pass
    family += _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()
    await proc.wait()
    await asyncio.get_running_loop().run_in_executor(None, lambda: psutil.wait_procs(family, timeout=grace))


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)


class _GatewayServer(uvicorn.Server):
    """uvicorn without its own signal handling: the launcher owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the gateway's socket before any engine starts, so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"the gateway cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(False)
    return sock


class Fleet:
    """A running fleet: engine processes plus the gateway over them."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        command: EngineCommand = engine_command,
        console: Console | None = None,
        echo_logs: bool = True,
    ) -> None:
        self.config = config
        self.console = console or Console(stderr=True, soft_wrap=True)
        bindings = cpu_bindings(config.models, sorted(os.sched_getaffinity(0)))
        self.engines = {
            m.name: EngineProcess(
                m,
                command=command,
                env={"VLLM_CPU_OMP_THREADS_BIND": bindings[m.name]} if m.name in bindings else None,
                console=self.console,
                echo_logs=echo_logs,
            )
            for m in config.models
        }
        self.backends = {name: Backend(e.cfg, e.lifecycle, e.client) for name, e in self.engines.items()}
        self.stopping = asyncio.Event()
        self.gateway_started = asyncio.Event()

    async def run(self) -> None:
        """Run until `stop()` (or a signal): engines and gateway, then a clean stop of everything."""
        started = time.monotonic()
        sock = bind_socket(self.config.gateway.host, self.config.gateway.port)
        tasks = [asyncio.create_task(e.run(), name=f"engine:{n}") for n, e in self.engines.items()]
        server = _GatewayServer(
            uvicorn.Config(
                create_app(self.backends),
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=int(STOP_GRACE),
                lifespan="on",
            )
        )
        gateway = asyncio.create_task(server.serve(sockets=[sock]), name="gateway")
        while not server.started and not gateway.done():
            await asyncio.sleep(0.01)
        if server.started:
            self.gateway_started.set()
            self.console.print(
                f"[bold]fleet[/bold] gateway: listening on http://{self.config.gateway.host}:{self.config.gateway.port}/v1 "
                f"(started in {time.monotonic() - started:.2f}s); {len(self.engines)} engine(s) loading",
                highlight=False,
            )
        try:
            await asyncio.wait({gateway, asyncio.create_task(self.stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await gateway
            sock.close()
            for e in self.engines.values():
                e.request_stop()
            await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Begin a clean stop (what SIGINT and SIGTERM do)."""
        self.stopping.set()

    def kill(self) -> None:
        """A second Ctrl-C: stop engines without waiting for requests to drain."""
        for e in self.engines.values():
            if e.proc and e.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(e.proc.pid, signal.SIGKILL)
        self.stop()


async def launch(config: FleetConfig, *, echo_logs: bool = True) -> None:
    """`fleet launch`: run a fleet in the foreground until SIGINT/SIGTERM."""
    fleet = Fleet(config, echo_logs=echo_logs)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            fleet.console.print("[bold]fleet[/bold]: stopping; Ctrl-C again to force", highlight=False)
            fleet.stop()
        else:
            fleet.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await fleet.run()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
