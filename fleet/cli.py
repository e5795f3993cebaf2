"""The `fleet` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from fleet import __version__
from fleet.config import DEFAULT_CONFIG, FleetConfig, load_config
from fleet.errors import ConfigError

CONFIG_OPTION = click.option(
    "--config",
    "-c",
    "config_path",
    type=click.Path(path_type=Path),
    default=DEFAULT_CONFIG,
    show_default=True,
    help="The fleet file.",
)


def _load(config_path: Path, **overrides: object) -> FleetConfig:
    try:
        return load_config(config_path, **overrides)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleet")
def main() -> None:
    """One OpenAI-compatible endpoint for a fleet of vLLM models, described in one fleet.toml."""


@main.command()
@CONFIG_OPTION
@click.option("--host", help="Override the gateway's listen address ([gateway] host).")
@click.option("--port", type=int, help="Override the gateway's port ([gateway] port).")
@click.option("--engine-logs/--no-engine-logs", default=True, show_default=True,
              help="Echo each engine's output, prefixed with its model name (always written to its log file).")
def launch(config_path: Path, host: str | None, port: int | None, engine_logs: bool) -> None:
    """Start one vLLM engine per model and the gateway; Ctrl-C stops everything."""
    from fleet.launcher import launch as run_launch

    config = _load(config_path, host=host, port=port)
    if not config.models:
        click.echo(f"error: {config_path}: no [[models]] to serve", err=True)
        sys.exit(2)
    try:
        asyncio.run(run_launch(config, echo_logs=engine_logs))
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@main.command()
@CONFIG_OPTION
def check(config_path: Path) -> None:
    """Validate the fleet file and print where each model will run."""
    config = _load(config_path)
    table = Table(title=f"{config_path}: gateway on {config.gateway.host}:{config.gateway.port}")
    for col in ("model", "source", "GPUs", "TP", "port", "memory", "eager"):
        table.add_column(col)
    for m in config.models:
        table.add_row(m.name, m.source, "CPU" if m.on_cpu else ",".join(map(str, m.gpus)),
                      str(m.tensor_parallel_size), str(m.port), f"{m.memory_fraction:.2f}", str(m.eager).lower())
    Console().print(table)


if __name__ == "__main__":
    main()
