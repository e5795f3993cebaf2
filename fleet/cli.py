"""The `fleet` command: its commands, each a few lines over the parts that do the work (a running
fleet is reached through fleet.remote).

May import: fleet (every part: it is the top floor; cluster only for a fleet file with [cluster]).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from rich.table import Table

from fleet import __version__
from fleet.config.load import load_config
from fleet.config.model import GIB, ModelConfig
from fleet.config.schema import DEFAULT_CONFIG, FleetConfig
from fleet.errors import ConfigError
from fleet.terminal import table_console

if TYPE_CHECKING:
    from fleet.cluster.connect import RayCluster

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


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run the launcher (and the gateway in it) on uvloop when installed, as the engines do: its C
    transports make every request cheaper; fall back to asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


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
    from fleet.machine.check import check_machine
    from fleet.run.foreground import launch as run_launch

    config = _load(config_path, host=host, port=port)
    if not config.models:
        click.echo(f"error: {config_path}: no [[models]] to serve", err=True)
        sys.exit(2)
    report = check_machine(config, config_path)
    cluster = _join_cluster(config, report, echo_logs=engine_logs)
    _report(report)
    try:
        run_loop(run_launch(config, echo_logs=engine_logs, config_path=config_path,
                            overrides={"host": host, "port": port}, runtimes=cluster))
    except ConfigError as e:  # refused before anything started: keys, an exposed gateway without them
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (OSError, RuntimeError) as e:  # a taken port; a gateway that stopped by itself (logged with its traceback)
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    finally:
        if cluster is not None:
            cluster.close()


def _join_cluster(config: FleetConfig, report: object, *, echo_logs: bool = True) -> RayCluster | None:
    """With [cluster]: join it, adding to the check report where every replica fits
    (fleet.cluster.connect.join); None without [cluster], and then Ray is never imported."""
    from fleet.machine.check import CheckReport

    assert isinstance(report, CheckReport)
    if config.cluster is None:
        return None
    from fleet.cluster.connect import join

    return join(config, config.cluster, report, echo_logs=echo_logs)


@main.command()
@CONFIG_OPTION
def check(config_path: Path) -> None:
    """Validate the fleet file and the machine; print where each model will run."""
    from fleet.machine.check import check_machine, gpu_rows
    from fleet.machine.probe import engine_dtype

    config = _load(config_path)
    report = check_machine(config, config_path)
    _check_exposure(config, report)
    if (cluster := _join_cluster(config, report, echo_logs=False)) is not None:
        cluster.close()
    console = table_console()
    console.print(f"{config_path}: gateway on {config.gateway.host}:{config.gateway.port}", highlight=False, soft_wrap=True)
    table = Table()
    for col in ("model", "source", "source state", "GPUs", "TP", "port", "memory", "dtype", "eager", "runs"):
        table.add_column(col, overflow="fold", no_wrap=col != "source")  # a name is never broken
    dtypes = {m.name: engine_dtype(m) for m in config.models}
    for m in config.models:
        memory = f"{m.kv_cache_gib or m.kv_cache_bytes / GIB:g} GiB KV" if m.kv_cache_bytes else f"{m.memory_fraction:.2f}"
        for r in m.replica_configs():  # one row per engine: a replica's own GPUs and port
            where = f"attached: {r.url}" if r.url else str(r.port)  # an attached engine's GPUs are its machine's
            devices = "CPU" if r.on_cpu else f"{len(r.gpus)} on a node" if r.gpu_count else ",".join(map(str, r.gpus))
            table.add_row(r.replica_name, m.source, report.sources[m.name].value, devices, str(r.tensor_parallel_size), where,
                          memory, dtypes[m.name][0], str(m.eager).lower(), runs(m))
    console.print(table)
    for m in config.models:
        if m.on_cpu and m.dtype == "auto":
            click.echo(f"{m.name}: {dtypes[m.name][0]} ({dtypes[m.name][1]})")
    if report.cluster:
        rooms = Table(title=f"cluster {config.cluster.address if config.cluster else ''}: where Ray has room now")
        for col in ("replica", "node"):
            rooms.add_column(col, no_wrap=True)
        for name, ids in report.cluster:
            rooms.add_row(name, ", ".join(f"{report.nodes.get(n, '?')} ({n[:8]})" for n in ids) or "no room")
        console.print(rooms)
    if config.sets:
        console.print(sets_table(config))
    if report.gpus:
        gpus = Table(title="GPUs")
        for col in ("GPU", "models", "memory fraction"):
            gpus.add_column(col)
        for g, names, total in gpu_rows(report):
            gpus.add_row(str(g), ", ".join(names), f"{total:.2f}")
        console.print(gpus)
    _report(report)


def runs(m: ModelConfig) -> str:
    """When a model's engines run, as `fleet check` says it: at launch or on demand, put away when idle
    (asleep, or stopped: on the CPU build sleeping is stopping), in its set."""
    when = "on demand" if m.start == "on_demand" else "at launch"
    if m.when_idle != "keep":
        how = "sleeps" if m.rest_level(idle=True) else "stops" if m.when_idle == "stop" else "stops (no sleep mode on the CPU)"
        when += f", {how} after {m.idle_after:g}s idle"
    if m.swap_set is not None:
        when += f"; set {m.swap_set}: {'sleeps' if m.rest_level(idle=False) else 'stops'} to make room"
    return when


def sets_table(config: FleetConfig) -> Table:
    """`fleet check`'s [[sets]]: each set's members (with priority), how many are awake at once, and
    how one is put away to make room."""
    from fleet.config.load import set_shares

    table = Table(title="sets: models that take turns (only as many awake as fit)")
    for col in ("set", "members (priority)", "awake at once", "min awake", "put away"):
        table.add_column(col, overflow="fold")
    for entry in config.sets:
        members = [m for name in entry.models if (m := config.model(name)) is not None]
        by_memory = entry.awake is None and set_shares(members) is not None
        awake = "as fit by gpu_memory_utilization" if by_memory else str(entry.awake or 1)
        away = {"asleep (level 1)" if m.rest_level(idle=False) == 1 else "asleep (level 2)" if m.rest_level(idle=False)
                else "stopped (no sleep mode on the CPU)" if m.on_cpu else "stopped" for m in members}
        table.add_row(entry.name, ", ".join(f"{m.name} ({m.priority})" for m in members), awake,
                      f"{entry.min_awake:g}s", "; ".join(sorted(away)))
    return table


def _check_exposure(config: FleetConfig, report: object) -> None:
    """What `fleet launch` will say about the gateway's exposure, among the check report."""
    from fleet.gateway.auth import check_exposure, load_keys
    from fleet.machine.check import CheckReport

    assert isinstance(report, CheckReport)
    try:
        if warning := check_exposure(config.gateway.host, load_keys(config.auth).enabled, config.auth.open):
            report.warnings.append(warning)
    except ConfigError as e:
        report.errors.append(str(e))


def _report(report: object) -> None:
    from fleet.machine.check import CheckReport

    assert isinstance(report, CheckReport)
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    if report.errors:
        click.echo("error: the fleet cannot start:\n" + "\n".join(f"  {e}" for e in report.errors), err=True)
        sys.exit(2)


def _control(method: str, path: str, config_path: Path, host: str | None, port: int | None,
             timeout: float = 120) -> bytes:
    """One request to the running fleet's control routes (fleet.remote); its failure, the CLI's message."""
    from fleet.remote import Remote, RemoteError

    try:
        return Remote.of(_load(config_path, host=host, port=port)).call(method, path, timeout=timeout)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RemoteError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


GATEWAY_OPTIONS = [
    click.option("--host", help="The running gateway's address (default: from the fleet file)."),
    click.option("--port", type=int, help="The running gateway's port (default: from the fleet file)."),
]


_F = TypeVar("_F", bound=Callable[..., Any])


def _gateway_options(f: _F) -> _F:
    for option in reversed(GATEWAY_OPTIONS):
        f = option(f)
    return CONFIG_OPTION(f)


@main.command()
@_gateway_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(config_path: Path, host: str | None, port: int | None, as_json: bool) -> None:
    """Ask the running fleet how each model is doing."""
    import msgspec

    from fleet.gateway.status import FleetStatus
    from fleet.terminal import status_rows, status_table

    raw = _control("GET", "/fleet/status", config_path, host, port)
    if as_json:
        click.echo(msgspec.json.format(raw, indent=2))
        return
    body = msgspec.json.decode(raw, type=FleetStatus)
    gw = body.gateway
    console = table_console()
    plain = not sys.stdout.isatty()
    headers, rows = status_rows(body)
    if not plain:
        console.print(f"fleet on {gw.host}:{gw.port} (pid {gw.pid})", highlight=False, soft_wrap=True)
    console.print(status_table(headers, rows, width=console.width, plain=plain))


@main.command()
@_gateway_options
def reload(config_path: Path, host: str | None, port: int | None) -> None:
    """Make the running fleet re-read its fleet file and apply the difference."""
    import msgspec

    from fleet.gateway.status import ReloadReport

    # a rolling reload starts a model's new replicas one after another: wait as long as that may take
    config = _load(config_path)
    longest = 120 + sum(m.replicas * (m.start_timeout + config.supervisor.drain_timeout) for m in config.models)
    report = msgspec.json.decode(_control("POST", "/fleet/reload", config_path, host, port, timeout=longest),
                                 type=ReloadReport)
    for key in ("added", "removed", "changed", "adapters", "unchanged"):
        click.echo(f"{key}: {', '.join(getattr(report, key)) or '-'}")
    for w in report.warnings:
        click.echo(f"warning: {w}")


@main.command()
@_gateway_options
@click.argument("model")
def sleep(config_path: Path, host: str | None, port: int | None, model: str) -> None:
    """Put MODEL away now (one started on demand): drained, then asleep on GPUs or stopped on the CPU."""
    _model_action(config_path, host, port, model, "sleep")


@main.command()
@_gateway_options
@click.argument("model")
def wake(config_path: Path, host: str | None, port: int | None, model: str) -> None:
    """Wake or start MODEL (one started on demand) now, as its next request would; waits until it serves."""
    _model_action(config_path, host, port, model, "wake")


def _model_action(config_path: Path, host: str | None, port: int | None, model: str, action: str) -> None:
    import urllib.parse

    import msgspec

    config = _load(config_path)
    m = config.model(model)
    longest = 60 + (m.start_timeout + config.supervisor.drain_timeout + config.supervisor.stop_grace if m else 0)
    path = f"/fleet/models/{urllib.parse.quote(model, safe='')}/{action}"
    answer = msgspec.json.decode(_control("POST", path, config_path, host, port, timeout=longest))
    click.echo(f"{model}: {answer['state']}")


@main.command()
@_gateway_options
def stop(config_path: Path, host: str | None, port: int | None) -> None:
    """Stop the running fleet (in-flight requests finish first)."""
    _control("POST", "/fleet/stop", config_path, host, port)
    click.echo("stopping")


@main.command()
@CONFIG_OPTION
@click.option("--model", "model_name", required=True, help="The model (its name in the fleet file).")
@click.option("--replica", type=int, default=None,
              help="Which of its replicas (0, 1, ...); default: its only attached one, or its only one.")
def engine(config_path: Path, model_name: str, replica: int | None) -> None:
    """Run one engine of the fleet in the foreground, exactly as `fleet launch` would: for a replica
    with a `url`, on its own machine. It accepts only the fleet's token ($FLEET_ENGINE_TOKEN or
    [gateway] engine_token_file)."""
    from fleet.config.schema import ENGINE_TOKEN_ENV, shared_engine_token
    from fleet.machine.check import SourceState, source_state
    from fleet.machine.probe import engine_dtype, port_in_use
    from fleet.run.local import engine_command

    config = _load(config_path)
    model = config.model(model_name)
    if model is None:
        _fail(f"{config_path}: no model named {model_name!r} (models: {', '.join(m.name for m in config.models)})")
    replicas = model.replica_configs()
    if replica is None:
        attached = [r for r in replicas if r.attached]
        if len(attached) != 1 and len(replicas) != 1:
            _fail(f"{config_path}: model {model_name!r} has {len(replicas)} replicas: say which with --replica")
        replica = attached[0].replica if len(attached) == 1 else 0
    if not 0 <= replica < len(replicas):
        _fail(f"{config_path}: model {model_name!r} has replicas 0 to {len(replicas) - 1}, not {replica}")
    cfg = replicas[replica]
    try:
        token = shared_engine_token(config.gateway, os.environ)
    except ValueError as e:
        _fail(f"{config_path}: {e}")
    if token is None:
        _fail(f"no engine token: set {ENGINE_TOKEN_ENV} or [gateway] engine_token_file, as for the gateway "
              "(an engine on the network answers only its fleet)")
    state, why = source_state(model)
    if state is SourceState.MISSING:
        _fail(f'{config_path}: model "{model_name}", field "source": {why}')
    if port_in_use(cfg.host, cfg.port):
        _fail(f"{cfg.host}:{cfg.port} is already in use by another process")
    where = f"CPU, {engine_dtype(cfg)[0]}" if cfg.on_cpu else f"GPUs {cfg.gpus}"
    reached = f"; the gateway reaches it at {cfg.url}" if cfg.url else ""
    click.echo(f"fleet engine {cfg.replica_name}: starting on {cfg.host}:{cfg.port} ({where}){reached}", err=True)
    env = {**os.environ, ENGINE_TOKEN_ENV: token, "PYTHONUNBUFFERED": "1",
           "CUDA_VISIBLE_DEVICES": ",".join(map(str, cfg.gpus))}
    command = engine_command(cfg)
    os.execve(command[0], command, env)  # the engine itself, in this process: signals reach it directly


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


@main.command()
@click.argument("model")
@click.option("--lines", "-n", default=50, show_default=True, help="How many of the last lines to show.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines.")
def logs(model: str, lines: int, follow: bool) -> None:
    """Show an engine's log (written by `fleet launch` to FLEET_LOG_DIR, default <cache>/logs)."""
    import collections
    import time

    from fleet.run.local import log_dir

    path = log_dir() / f"{model}.log"
    if not path.is_file():
        click.echo(f"error: no log for model {model!r} at {path}", err=True)
        sys.exit(1)
    with path.open(errors="replace") as f:
        for line in collections.deque(f, maxlen=lines):
            click.echo(line, nl=False)
        while follow:
            line = f.readline()
            if line:
                click.echo(line, nl=False)
            else:
                time.sleep(0.2)


if __name__ == "__main__":
    main()
