"""Run a fleet like `fleet launch` does, with a choice of engine command and event loop.

    python bench/fleet_runner.py --config fleet.toml --engine null      # bench/null_engine.py
    python bench/fleet_runner.py --config fleet.toml --engine vllm      # fleet.engine (= fleet launch)
    python bench/fleet_runner.py ... --loop uvloop                      # try the gateway on uvloop

It builds `fleet.launcher.Fleet(config, command=...)` and handles SIGINT/SIGTERM exactly as
`fleet.launcher.launch` does; with the defaults (``--engine vllm --loop asyncio``) it is
`fleet launch --config ... --no-engine-logs`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.null_engine import null_command  # noqa: E402
from fleet.config import load_config  # noqa: E402
from fleet.launcher import Fleet, engine_command  # noqa: E402


async def run(config_path: Path, engine: str, echo_logs: bool) -> None:
    config = load_config(config_path)
    fleet = Fleet(config, command=null_command if engine == "null" else engine_command, echo_logs=echo_logs)
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        fleet.stop() if signals == 1 else fleet.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    await fleet.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleet_runner.py", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--engine", choices=["null", "vllm"], default="vllm")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                        help="asyncio is what `fleet launch` uses today")
    parser.add_argument("--engine-logs", action="store_true")
    ns = parser.parse_args(argv)
    coro = run(ns.config, ns.engine, ns.engine_logs)
    if ns.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
