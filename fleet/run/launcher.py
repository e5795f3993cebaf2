"""`fleet launch`: every engine at once, the gateway over them, reloads, and a clean stop.

A `Fleet` owns one `EngineProcess` (supervisor.py) per model and the gateway server, in one
event loop. Signal handlers only set events; the main coroutine acts on them:
SIGINT/SIGTERM stop (a second one forces), SIGHUP reloads fleet.toml.

Reload applies only the difference: new models start, removed ones stop taking requests, drain
and stop, changed ones drain and restart with their new settings; untouched models never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from rich.console import Console

from fleet.config.load import load_config
from fleet.config.schema import FleetConfig, ModelConfig
from fleet.gateway.admission import Admission
from fleet.gateway.app import create_app
from fleet.gateway.auth import load_keys
from fleet.gateway.backend import Backend
from fleet.gateway.status import EngineState, FleetStatus, GatewayStatus, ModelStatus, ReloadReport
from fleet.run.process import SignalFreeServer, freeze_startup_heap
from fleet.run.supervisor import EngineCommand, EngineProcess, engine_command


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


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the gateway's socket before any engine starts, so a taken port fails fast."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on accepted sockets whose proto is
    # IPPROTO_TCP; with 0 Nagle holds back every response write after the first (~40 ms per request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
        loader: Callable[[], FleetConfig] | None = None,
    ) -> None:
        self.config = config
        self.command = command
        self.echo_logs = echo_logs
        self.loader = loader  # re-reads the fleet file for reload; None: reload needs a config
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.engines: dict[str, EngineProcess] = {}
        self.backends: dict[str, Backend] = {}  # shared with the gateway: it routes on this
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()
        self.gateway_started = asyncio.Event()
        self.started_at = time.time()
        self._reload_lock = asyncio.Lock()
        self.token = secrets.token_urlsafe(32)  # engines refuse requests without it
        self.keys = load_keys(config.auth)
        bindings = cpu_bindings(config.models, sorted(os.sched_getaffinity(0)))
        for m in config.models:
            self._add(m, bindings.get(m.name))

    def _add(self, cfg: ModelConfig, binding: str | None = None) -> EngineProcess:
        engine = EngineProcess(
            cfg,
            command=self.command,
            env={"VLLM_CPU_OMP_THREADS_BIND": binding} if binding else None,
            console=self.console,
            echo_logs=self.echo_logs,
            policy=self.config.supervisor,
            token=self.token,
            engine_timeout=self.config.gateway.engine_timeout,
        )
        self.engines[cfg.name] = engine
        limits = cfg.limits
        admission = Admission(cfg.name, limits.max_concurrent, limits.max_queued, limits.queue_timeout)
        self.backends[cfg.name] = Backend(cfg, engine.lifecycle, engine.client, admission=admission)
        return engine

    def _start(self, name: str) -> None:
        self.tasks[name] = asyncio.create_task(self.engines[name].run(), name=f"engine:{name}")

    async def run(self) -> None:
        """Run until `stop()` (or a signal): engines and gateway, then a clean stop of everything."""
        started = time.monotonic()
        gw = self.config.gateway
        sock = bind_socket(gw.host, gw.port)
        server = SignalFreeServer(
            uvicorn.Config(
                create_app(self.backends, control=self, keys=self.keys, gateway=gw,
                           restarts=lambda n: self.engines[n].total_restarts if n in self.engines else 0),
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=int(self.config.supervisor.drain_timeout),
                lifespan="on",
                ws="none",  # no websocket routes: skip importing a websocket implementation
            )
        )
        gateway = asyncio.create_task(server.serve(sockets=[sock]), name="gateway")
        while not server.started and not gateway.done():  # noqa: ASYNC110 - uvicorn has a `started` flag, no event
            await asyncio.sleep(0.01)
        # Engines after the gateway: their start-up work in this process (spawning, the first
        # health polls, importing the engine client) would otherwise delay the gateway's start.
        for name in self.engines:
            self._start(name)
        if server.started:
            self.gateway_started.set()
            self.console.print(
                f"[bold]fleet[/bold] gateway: listening on http://{gw.host}:{gw.port}/v1 "
                f"(started in {time.monotonic() - started:.2f}s); {len(self.engines)} engine(s) loading",
                highlight=False,
            )
        try:
            await asyncio.wait({gateway, asyncio.create_task(self.stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True  # stop accepting; uvicorn drains open requests first
            with contextlib.suppress(BaseException):
                await gateway
            sock.close()
            for e in self.engines.values():
                e.request_stop()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def stop(self) -> None:
        """Begin a clean stop (what SIGINT and SIGTERM do)."""
        self.stopping.set()

    def kill(self) -> None:
        """A second Ctrl-C: kill engines without waiting for requests to drain."""
        for e in self.engines.values():
            e.request_kill()
        self.stop()

    # --- reload ---------------------------------------------------------------------------

    async def reload(self, new: FleetConfig | None = None) -> ReloadReport:
        """Apply a new fleet file: start added models, drain and stop removed ones, restart changed ones."""
        async with self._reload_lock:
            if new is None:
                if self.loader is None:
                    raise RuntimeError("this fleet was not started from a file; pass the new config")
                new = self.loader()
            report = ReloadReport()
            old = {m.name: m for m in self.config.models}
            fresh = {m.name: m for m in new.models}
            report.added = [n for n in fresh if n not in old]
            report.removed = [n for n in old if n not in fresh]
            report.changed = [n for n in fresh if n in old and fresh[n] != old[n]]
            report.unchanged = [n for n in fresh if n in old and fresh[n] == old[n]]
            if new.gateway != self.config.gateway:
                report.warnings.append("[gateway] changed: restart the fleet to apply it")
            if new.supervisor != self.config.supervisor:
                report.warnings.append("[supervisor] changed: applies to engines started from now on")
            self.config = new.model_copy(update={"gateway": self.config.gateway})
            self.console.print(
                f"[bold]fleet[/bold]: reload: +{report.added} -{report.removed} ~{report.changed}", highlight=False
            )
            await asyncio.gather(
                *(self._retire(n) for n in report.removed), *(self._replace(fresh[n]) for n in report.changed)
            )
            for name in report.added:
                self._add(fresh[name])
                self._start(name)
            return report

    async def _drain_and_stop(self, backend: Backend, engine: EngineProcess, task: asyncio.Task[None]) -> None:
        engine.request_stop(drain=backend.stats.drained, timeout=self.config.supervisor.drain_timeout)
        await task

    async def _retire(self, name: str) -> None:
        """A removed model: out of routing at once (404), its requests finish, then its engine stops."""
        backend = self.backends.pop(name)
        await self._drain_and_stop(backend, self.engines.pop(name), self.tasks.pop(name))

    async def _replace(self, cfg: ModelConfig) -> None:
        """A changed model: new requests get 503 while the old engine drains and the new one starts."""
        name = cfg.name
        old = self.backends[name], self.engines[name], self.tasks.pop(name)
        self._add(cfg)  # routing now sees the new engine, not started yet
        await self._drain_and_stop(*old)
        self._start(name)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> FleetStatus:
        """What `fleet status` shows: the gateway and one row per model."""
        now = time.monotonic()
        rows = []
        for name, engine in self.engines.items():
            backend = self.backends.get(name)
            lc = engine.lifecycle
            ready = engine.ready_at is not None and lc.state is EngineState.READY
            rows.append(ModelStatus(
                model=name,
                state=lc.state,
                reason=lc.reason,
                gpus=list(engine.cfg.gpus),
                port=engine.cfg.port,
                pid=engine.pid,
                uptime_s=round(now - engine.ready_at, 1) if ready and engine.ready_at is not None else None,
                restarts=engine.total_restarts,
                inflight=backend.stats.inflight if backend else 0,
                requests=backend.stats.requests if backend else 0,
                tokens_per_s=round(backend.stats.tokens_per_second(), 1) if backend else 0.0,
            ))
        gw = self.config.gateway
        return FleetStatus(GatewayStatus(gw.host, gw.port, os.getpid(), int(self.started_at)), rows)


async def launch(config: FleetConfig, *, echo_logs: bool = True, config_path: Path | None = None,
                 overrides: dict[str, Any] | None = None, command: EngineCommand = engine_command) -> None:
    """`fleet launch`: run a fleet in the foreground until SIGINT/SIGTERM; SIGHUP reloads."""
    loader = (lambda: load_config(config_path, **(overrides or {}))) if config_path else None
    fleet = Fleet(config, echo_logs=echo_logs, loader=loader, command=command)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_stop_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            fleet.console.print("[bold]fleet[/bold]: stopping; Ctrl-C again to force", highlight=False)
            fleet.stop()
        else:
            fleet.kill()

    def on_hangup() -> None:
        task = asyncio.ensure_future(fleet.reload())
        task.add_done_callback(report_reload)

    def report_reload(task: asyncio.Future[ReloadReport]) -> None:
        if (error := task.exception()) is not None:
            fleet.console.print(f"[red]reload failed[/red]: {error}")

    async def settle_heap() -> None:
        await fleet.gateway_started.wait()
        freeze_startup_heap()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    settled = asyncio.create_task(settle_heap())
    try:
        await fleet.run()
    finally:
        settled.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
