"""`fleet launch` in the foreground: a `Fleet` (launcher.py) run until a signal. Signal handlers
only send it commands: SIGINT/SIGTERM stop (a second one forces), SIGHUP reloads fleet.toml."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from fleet.config.load import load_config
from fleet.config.schema import FleetConfig
from fleet.gateway.guard import raise_open_files_limit
from fleet.gateway.status import ReloadReport
from fleet.run.launcher import Fleet
from fleet.run.local import EngineCommand, engine_command
from fleet.run.process import freeze_startup_heap
from fleet.run.runtime import Runtimes


async def launch(config: FleetConfig, *, echo_logs: bool = True, config_path: Path | None = None,
                 overrides: dict[str, Any] | None = None, command: EngineCommand = engine_command,
                 runtimes: Runtimes | None = None) -> None:
    """`fleet launch`: run a fleet in the foreground until SIGINT/SIGTERM; SIGHUP reloads. With
    `runtimes` (a cluster's), the engines it starts run there."""
    loader = (lambda: load_config(config_path, **(overrides or {}))) if config_path else None
    open_files = raise_open_files_limit()
    fleet = Fleet(config, echo_logs=echo_logs, loader=loader, command=command, runtimes=runtimes)
    limits = fleet.connection_limits
    fleet.console.print(
        f"[bold]fleet[/bold] gateway: at most {limits.max_connections} client connections "
        f"({limits.max_per_client} per address) of {open_files} open files; headers within "
        f"{limits.header_timeout:g}s, body pauses up to {limits.body_timeout:g}s", highlight=False)
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
