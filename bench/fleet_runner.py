"""Run a fleet like `fleet launch` does, with a choice of engine command and event loop.

    python bench/fleet_runner.py --config fleet.toml --engine null      # bench/null_engine.py
    python bench/fleet_runner.py --config fleet.toml --engine vllm      # fleet.engine (= fleet launch)

It calls `fleet.run.foreground.launch(config, command=...)` on the event loop `fleet launch` uses
(`fleet.cli.run_loop`); with ``--engine vllm`` it is `fleet launch --config ... --no-engine-logs`,
minus the CLI's placement report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.null_engine import null_command
from fleet.cli import run_loop
from fleet.config.load import load_config
from fleet.run.foreground import launch
from fleet.run.local import engine_command


async def run(config_path: Path, engine: str, echo_logs: bool) -> None:
    config = load_config(config_path)
    command = null_command if engine == "null" else engine_command
    await launch(config, echo_logs=echo_logs, config_path=config_path, command=command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fleet_runner.py", description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--engine", choices=["null", "vllm"], default="vllm")
    parser.add_argument("--engine-logs", action="store_true")
    ns = parser.parse_args(argv)
    run_loop(run(ns.config, ns.engine, ns.engine_logs))


if __name__ == "__main__":
    main()
