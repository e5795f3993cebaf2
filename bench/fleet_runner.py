"""Run a fleet like `fleet launch` does, with a choice of engine command and event loop.

    python bench/fleet_runner.py --config fleet.toml --engine null      # bench/null_engine.py
    python bench/fleet_runner.py --config fleet.toml --engine vllm      # fleet.engine (= fleet launch)
    python bench/fleet_runner.py ... --loop uvloop                      # try the gateway on uvloop

It calls `fleet.launcher.launch(config, command=...)` (a `Fleet(config, command=...)` with the
launcher's own signal handling); with the defaults (``--engine vllm --loop asyncio``) it is
`fleet launch --config ... --no-engine-logs`, minus the CLI's placement report.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.null_engine import null_command
from fleet.config import load_config
from fleet.launcher import engine_command, launch


async def run(config_path: Path, engine: str, echo_logs: bool) -> None:
    config = load_config(config_path)
    command = null_command if engine == "null" else engine_command
    await launch(config, echo_logs=echo_logs, config_path=config_path, command=command)


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
