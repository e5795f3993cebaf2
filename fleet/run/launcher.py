"""A running fleet: every engine at once, the gateway over them, reloads, and a clean stop.

A `Fleet` owns one engine owner per replica (`EngineOwner`, owner.py, over the replica's runtime:
a process of this machine, local.py; an engine on a cluster's node, from the `Runtimes` it is
given; an engine at a url, attached.py) and the gateway server, in one event loop; foreground.py
turns signals into its commands.

Reload applies only the difference (reload.py finds it): new models start, removed ones stop
taking requests, drain and stop, changed ones roll one replica at a time, those changed in their
adapters alone load and drop them in place; untouched models never notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fleet.config.load import set_budget, set_shares
from fleet.config.model import ModelConfig
from fleet.config.schema import FleetConfig, shared_engine_token
from fleet.errors import EngineFailure
from fleet.gateway.admission import Admission
from fleet.gateway.app import create_app
from fleet.gateway.auth import check_exposure, load_keys
from fleet.gateway.guard import PER_ENGINE_RESERVE, ConnectionCounts, ConnectionLimits
from fleet.gateway.model import ServedModel
from fleet.gateway.routing.replicas import Replica
from fleet.gateway.status import ReloadReport
from fleet.gateway.store import SqliteResponses
from fleet.lifecycle import EngineState
from fleet.machine.check import can_run_together
from fleet.machine.probe import cpu_bindings
from fleet.run.attached import Attached
from fleet.run.control import FleetControl
from fleet.run.demand import OnDemand
from fleet.run.gateway_server import GatewayServer
from fleet.run.journal import Journal
from fleet.run.local import EngineCommand, LocalRuntimes, engine_command
from fleet.run.owner import EngineOwner, backoff
from fleet.run.reload import kept_for_restart, plan_reload
from fleet.run.runtime import Runtime, Runtimes
from fleet.run.swap import SwapSet
from fleet.sources import cache_dir

log = logging.getLogger("fleet.run")


Taken = tuple[Replica, EngineOwner, "asyncio.Task[None]"]  # a replica out of the fleet's books, still to be stopped


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
        runtimes: Runtimes | None = None,
    ) -> None:
        self.config = config
        self.runtimes = runtimes or LocalRuntimes(command)  # where the engines it starts run
        self.echo_logs = echo_logs
        self.loader = loader  # re-reads the fleet file for reload; None: reload needs a config
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.owners: dict[str, EngineOwner] = {}  # by replica name
        self.models: dict[str, ServedModel] = {}  # shared with the gateway: it routes on this
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.idle_watches: dict[str, asyncio.Task[None]] = {}  # by model: its OnDemand's watch_idle (when_idle)
        self.swaps: dict[str, SwapSet] = {}  # by name: the [[sets]] entries, each the owner of its room
        self._owner_deaths: dict[str, int] = {}  # owner tasks of a model that died in a row (_owner_ended)
        self.stopping = asyncio.Event()
        self.gateway_started = asyncio.Event()
        self.started_at = time.time()
        self._reload_lock = asyncio.Lock()
        # engines refuse requests without it; shared with attached engines only when set (fleet check says so)
        self.token = shared_engine_token(config.gateway, os.environ) or secrets.token_urlsafe(32)
        self.connections = ConnectionCounts()  # the gateway's client connections (guard.py)
        self.journal = Journal()  # the engines' lines and state changes, for the status page
        self.control = FleetControl(self)  # what the gateway's control routes and status page ask
        self.keys = load_keys(config.auth)
        # a gateway other machines can reach, without keys: refused (ConfigError) unless [auth] open
        if warning := check_exposure(config.gateway.host, self.keys.enabled, config.auth.open):
            self.console.print(f"[bold yellow]warning[/bold yellow]: {warning}", highlight=False)
        self._sets(config)
        bindings = self._bindings(config.models)
        for m in config.models:
            self._add(m, bindings)

    def _sets(self, config: FleetConfig) -> None:
        """The [[sets]] entries of `config`, each a SwapSet over the fleet's live models."""
        before, self.swaps = self.swaps, {}
        for entry in config.sets:
            members = [m for m in config.models if m.name in entry.models]
            by_memory = entry.awake is None and set_shares(members) is not None
            lock = before[entry.name].lock if entry.name in before else None
            self.swaps[entry.name] = SwapSet(entry, self.models, set_budget(config, entry), by_memory, lock)

    def _add(self, cfg: ModelConfig, bindings: dict[str, str] | None = None) -> list[str]:
        """A model's engines (one owner per replica, named by `replica_name`) and the model as the
        gateway serves it; the replicas' names, to start them."""
        replicas = [self._replica(rc, bindings) for rc in cfg.replica_configs()]
        self.models[cfg.name] = served = ServedModel(cfg, replicas, admission=self._admission(cfg))
        self._on_demand(served)
        return [r.name for r in replicas]

    def _on_demand(self, served: ServedModel) -> None:
        """A model started on demand gets its OnDemand (requests wait for its engines), one stopped when
        idle its idle watch too (once the loop runs); a model that is neither, none."""
        cfg = served.config
        swap = self.swaps.get(cfg.swap_set) if cfg.swap_set else None
        demand = OnDemand(served, self.owners, self.config.supervisor.drain_timeout, swap) if cfg.on_demand else None
        served.demand = demand
        if (watch := self.idle_watches.pop(cfg.name, None)) is not None:
            watch.cancel()
        if demand is not None and cfg.when_idle != "keep" and self.gateway_started.is_set():
            self.idle_watches[cfg.name] = asyncio.create_task(demand.watch_idle(), name=f"idle:{cfg.name}")

    def _bindings(self, models: Sequence[ModelConfig]) -> dict[str, str]:
        """Core sets for this machine's CPU engines (none for a cluster's: each node binds its own)."""
        if not self.runtimes.on_this_machine:
            return {}
        return cpu_bindings(models, sorted(os.sched_getaffinity(0)), os.environ)

    def _replica(self, rc: ModelConfig, bindings: dict[str, str] | None = None) -> Replica:
        """One replica's engine owner (over the engine's runtime), in the fleet's books; its routing view."""
        owner = EngineOwner(rc, self._runtime(rc, bindings), console=self.console, policy=self.config.supervisor,
                            token=self.token, engine_timeout=self.config.gateway.engine_timeout)
        owner.keep_journal(self.journal)
        self.owners[rc.replica_name] = owner
        return Replica(rc.replica_name, owner.lifecycle, owner.client, slot=rc.replica)

    def _runtime(self, rc: ModelConfig, bindings: dict[str, str] | None) -> Runtime:
        """How one replica's engine runs: attached (a url), or started by the fleet's runtimes
        (this machine's CPU engines each on their own cores)."""
        if rc.attached:
            return Attached(rc)
        binding = (bindings or {}).get(rc.replica_name)
        return self.runtimes.runtime(rc, env={"VLLM_CPU_OMP_THREADS_BIND": binding} if binding else {},
                                     console=self.console, echo_logs=self.echo_logs, token=self.token)

    @staticmethod
    def _admission(cfg: ModelConfig) -> Admission:
        limits = cfg.limits
        return Admission(cfg.name, limits.max_concurrent * cfg.replicas, limits.max_queued, limits.queue_timeout)

    def _start(self, name: str, after: float = 0.0) -> None:
        owner, began = self.owners[name], time.monotonic()
        task = asyncio.create_task(owner.run(after=after), name=f"engine:{name}")
        task.add_done_callback(lambda t: self._owner_ended(name, owner, t, began))
        self.tasks[name] = task

    def _owner_ended(self, name: str, owner: EngineOwner, task: asyncio.Task[None], began: float) -> None:
        """An engine's owner task ended: as meant once the fleet stops or the engine was asked to stop
        (reload, retire); otherwise a loud error, and a new owner after the restart backoff."""
        error = None if task.cancelled() else task.exception()
        meant = self.stopping.is_set() or owner.stop_requested or self.owners.get(name) is not owner
        if meant and error is None:
            return
        what = "was cancelled" if task.cancelled() else f"died: {type(error).__name__}: {error}" if error else "ended"
        log.error("%s: the engine's owner task %s", name, what, exc_info=error)
        policy = self.config.supervisor
        deaths = 0 if time.monotonic() - began > policy.restart_reset_after else self._owner_deaths.get(name, 0)
        self._owner_deaths[name] = deaths + 1
        again = "" if meant else f"; a new one in {backoff(policy, deaths):.1f}s"
        self.console.print(f"[bold]fleet[/bold] {escape(name)}: [red]its supervisor {escape(what)}[/red]{again}",
                           highlight=False)
        if not meant:
            self._start(name, after=backoff(policy, deaths))

    def restarts_of(self, model: str) -> int:
        """Restarts of a model's engines, all replicas together (for /metrics)."""
        served = self.models.get(model)
        return sum(self.owners[r.name].total_restarts for r in served.replicas if r.name in self.owners) if served else 0

    @property
    def connection_limits(self) -> ConnectionLimits:
        """What clients may hold of the gateway: [gateway]'s timeouts, caps sized from the
        open-files limit less what the engines' connections may need (guard.py)."""
        gw = self.config.gateway
        engine_connections = sum(m.limits.max_concurrent + PER_ENGINE_RESERVE for m in self.config.models)
        return ConnectionLimits.sized(header_timeout=gw.header_timeout, body_timeout=gw.body_timeout,
                                      engine_connections=engine_connections, max_connections=gw.max_connections,
                                      max_per_client=gw.max_connections_per_client,
                                      max_header_bytes=gw.max_header_bytes)

    async def run(self) -> None:
        """Run until `stop()` (or a signal): engines and gateway, then a clean stop of everything."""
        started = time.monotonic()
        gw = self.config.gateway
        responses = self._responses()
        app = create_app(self.models, control=self.control, keys=self.keys, gateway=gw,
                         restarts=self.restarts_of, connections=self.connections,
                         ui=self.config.ui, admin_key=self.config.ui.admin_secret(os.environ), responses=responses)
        server = GatewayServer(app, gw, self.connection_limits, self.connections, console=self.console,
                               drain_timeout=self.config.supervisor.drain_timeout, started=self.gateway_started)
        gateway = asyncio.create_task(server.run(), name="gateway")
        await asyncio.wait({gateway, asyncio.ensure_future(self.gateway_started.wait())},
                           return_when=asyncio.FIRST_COMPLETED)
        # Engines after the gateway: their start-up work in this process (spawning, the first
        # health polls, importing the engine client) would otherwise delay the gateway's start.
        if self.gateway_started.is_set():
            for name in self.owners:
                self._start(name)
            for served in self.models.values():
                self._on_demand(served)
            for swap in self.swaps.values():
                swap.launch()
            self.console.print(
                f"[bold]fleet[/bold] gateway: listening on {'https' if gw.tls_certfile else 'http'}://{gw.host}:{gw.port}/v1 "
                f"(started in {time.monotonic() - started:.2f}s); {len(self.owners)} engine(s) loading",
                highlight=False,
            )
        try:
            await asyncio.wait({gateway, asyncio.create_task(self.stopping.wait())}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed = gateway.done() and not self.stopping.is_set()  # the gateway could not run: loud, not silent
            server.request_stop()  # stop accepting; uvicorn drains open requests first
            with contextlib.suppress(BaseException):
                await gateway
            for watch in self.idle_watches.values():
                watch.cancel()
            for owner in self.owners.values():
                owner.request_stop()
            await asyncio.gather(*self.tasks.values(), *self.idle_watches.values(), return_exceptions=True)
            responses.close()
        if failed:
            error = None if gateway.cancelled() else gateway.exception()
            log.error("the gateway stopped; the fleet stopped with it", exc_info=error)
            raise RuntimeError(f"the gateway stopped ({error!r}); every engine was stopped") from error

    def _responses(self) -> SqliteResponses:
        """The store of /v1/responses' stored responses ([responses]: a SQLite file, in the cache by default)."""
        cfg = self.config.responses
        path = Path(cfg.store_path).expanduser() if cfg.store_path else cache_dir() / "responses.sqlite3"
        return SqliteResponses(path, max_age_days=cfg.max_age_days, max_stored=cfg.max_stored)

    def stop(self) -> None:
        """Begin a clean stop (what SIGINT and SIGTERM do)."""
        self.stopping.set()

    def kill(self) -> None:
        """A second Ctrl-C: kill engines without waiting for requests to drain."""
        for owner in self.owners.values():
            owner.request_kill()
        self.stop()

    # --- reload ---------------------------------------------------------------------------

    async def reload(self, new: FleetConfig | None = None) -> ReloadReport:
        """Apply a new fleet file: start added models, drain and stop removed ones, restart changed ones."""
        async with self._reload_lock:
            if new is None:
                if self.loader is None:
                    raise RuntimeError("this fleet was not started from a file; pass the new config")
                new = self.loader()
            report = plan_reload(self.config, new)
            fresh = {m.name: m for m in new.models}
            sets_changed = new.sets != self.config.sets
            self.config = kept_for_restart(self.config, new)
            if sets_changed or report.changed or report.adapters or report.added:
                self._sets(new)
                for served in self.models.values():
                    self._on_demand(served)
            self.console.print(f"[bold]fleet[/bold]: reload: +{report.added} -{report.removed} ~{report.changed}"
                               + (f" adapters {report.adapters}" if report.adapters else ""), highlight=False)
            # new engines get the core sets they would get at launch (an unbound CPU engine would
            # spread onto the cores of the others: process.keep_to_bound_cores says what that costs)
            bindings = self._bindings(new.models)
            for name in report.adapters:  # no restart
                report.warnings += await self._swap_adapters(self.models[name], fresh[name])
            stopped = await asyncio.gather(
                *(self._replace(fresh[n], bindings) for n in report.changed), *(self._retire(n) for n in report.removed)
            )
            report.warnings += [w for w in stopped if w]
            for name in report.added:
                for engine_name in self._add(fresh[name], bindings):
                    self._start(engine_name)
            return report

    async def _swap_adapters(self, served: ServedModel, cfg: ModelConfig) -> list[str]:
        """A model whose file changed only in its adapters: its ready engines load the new ones and
        drop the removed ones, without a restart; what failed, as warnings."""
        old, new = served.config.adapters, cfg.adapters
        served.config = cfg
        for rc, replica in zip(cfg.replica_configs(), served.replicas, strict=False):
            if (owner := self.owners.get(replica.name)) is not None:
                owner.adopt(rc)
        warnings = []
        ready = [self.owners[r.name] for r in served.replicas
                 if r.name in self.owners and self.owners[r.name].lifecycle.state is EngineState.READY]
        for name in [n for n in old if n not in new or new[n] != old[n]]:
            served.adapter_paths.pop(name, None)
            for owner in ready:
                with contextlib.suppress(EngineFailure, OSError):
                    await owner.client.unload_adapter(name)
        for name in [n for n in new if n not in old or new[n] != old[n]]:
            try:
                for owner in ready:
                    await owner.client.load_adapter(name, new[name])
            except EngineFailure as e:
                warnings.append(f"{cfg.name}: adapter {name} not loaded: {e}")
                continue
            served.adapter_paths[name] = new[name]
        return warnings

    def _take(self, replica: Replica) -> Taken:
        """A replica's engine and owner task, out of the fleet's books (its successor may take its name)."""
        return replica, self.owners.pop(replica.name), self.tasks.pop(replica.name)

    async def _drain_and_stop(self, taken: list[Taken]) -> None:
        """Replicas already out of routing: their requests finish (at most drain_timeout), then their engines stop."""
        for replica, owner, _ in taken:
            owner.request_stop(drain=replica.stats.drained, timeout=self.config.supervisor.drain_timeout)
        await asyncio.gather(*(task for _, _, task in taken))

    async def _retire(self, name: str) -> None:
        """A removed model: out of routing at once (404), its requests finish, then its engines stop."""
        served = self.models.pop(name)
        if (watch := self.idle_watches.pop(name, None)) is not None:
            watch.cancel()
        await self._drain_and_stop([self._take(r) for r in served.replicas])

    async def _replace(self, cfg: ModelConfig, bindings: dict[str, str] | None = None) -> str | None:
        """A changed model, rolled one replica at a time so that it never loses all its copies at
        once: each successor starts and is ready before its predecessor leaves routing, drains and
        stops; where the two cannot run at once (machine.check.can_run_together), the predecessor leaves first (then only a
        model with one replica has a gap). A successor that fails stops the roll: the replicas not
        reached yet keep their settings and serve (the returned warning says so)."""
        served = self.models[cfg.name]
        before = list(served.replicas)
        after = cfg.replica_configs()
        served.config = cfg  # what the gateway plans requests with, from now on
        served.adapter_paths = dict(cfg.adapters)  # new engines know the file's adapters (not those loaded since)
        self._on_demand(served)
        if served.admission is not None:
            limits = cfg.limits
            served.admission.resize(limits.max_concurrent * cfg.replicas, limits.max_queued, limits.queue_timeout)
        for k in range(max(len(before), len(after))):
            old = self._take(before[k]) if k < len(before) else None
            # on a cluster the successor may need what its predecessor holds: Ray would hold it back
            together = (old is not None and k < len(after) and self.runtimes.on_this_machine
                        and can_run_together(old[1].cfg, after[k]))
            if old is not None and not together:
                served.replicas.remove(old[0])  # it leaves first: gone for good, or in its successor's way
                await self._drain_and_stop([old])
                old = None
            if k >= len(after):
                continue
            new = self._replica(after[k], bindings)
            served.replicas.append(new)
            self._start(new.name)
            state = await self.owners[new.name].lifecycle.settled(cfg.start_timeout)
            took = state in (EngineState.READY, EngineState.IDLE)  # IDLE: on demand, it starts on a request
            if old is not None:  # both ran at once: the one that is not ready goes
                goes, stays = (old, new) if took else (self._take(new), old[0])
                served.replicas.remove(goes[0])
                await self._drain_and_stop([goes])
                if stays is old[0]:  # back in the books: it serves on with its old settings
                    self.owners[old[0].name], self.tasks[old[0].name] = old[1], old[2]
            if not took:
                kept = [r.name for r in before[k:] if r in served.replicas]
                return (f"{cfg.name}: the rolling reload stopped at replica {k} ({new.lifecycle.reason or state.value}); "
                        f"{', '.join(kept) or 'no replica'} kept the previous settings")
        return None
