"""The launcher's side of the gateway's `Control` (fleet.gateway.control): what `fleet status`,
`fleet reload`, `fleet stop` and the status page ask of a running fleet, answered from its books.

`FleetControl` reads the launcher's books (`Books`: the `Fleet`'s models, replicas and engine
owners) and sends the owners commands (restart, drain); it owns nothing itself. The launcher
imports it, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Protocol

from rich.markup import escape

from fleet.config.adapters import check_adapter
from fleet.errors import EngineFailure, EngineNotFound, InvalidRequest, ModelNotFound, ModelNotReady, shown
from fleet.gateway.status import FleetStatus, GatewayStatus, ModelStatus, ReloadReport
from fleet.lifecycle import AWAY, EngineState, closest_to_serving
from fleet.run.demand import OnDemand

if TYPE_CHECKING:
    from rich.console import Console

    from fleet.config.schema import FleetConfig
    from fleet.gateway.model import ServedModel
    from fleet.gateway.routing.replicas import Replica
    from fleet.run.journal import Journal
    from fleet.run.owner import EngineOwner

class Books(Protocol):
    """What `FleetControl` reads of the launcher's `Fleet`, and the two commands it passes on."""

    config: FleetConfig
    journal: Journal
    stopping: asyncio.Event
    console: Console
    started_at: float
    owners: dict[str, EngineOwner]
    models: dict[str, ServedModel]

    async def reload(self) -> ReloadReport: ...
    def stop(self) -> None: ...


class FleetControl:
    """One running `Fleet` as the gateway's control routes and status page see it."""

    def __init__(self, fleet: Books) -> None:
        self._fleet = fleet

    @property
    def config(self) -> FleetConfig:
        return self._fleet.config

    @property
    def journal(self) -> Journal:
        return self._fleet.journal

    @property
    def stopping(self) -> asyncio.Event:
        return self._fleet.stopping

    async def reload(self) -> ReloadReport:
        """Re-read the fleet file and apply the difference."""
        return await self._fleet.reload()

    def stop(self) -> None:
        """Begin a clean stop."""
        self._fleet.stop()

    def restart(self, engine: str) -> None:
        """Restart one engine now (its owner stops it with its grace and starts it anew)."""
        _, owner = self._replica_named(engine)
        if not owner.runtime.restartable:
            raise InvalidRequest(f"{engine} runs at {owner.cfg.url}, started elsewhere: restart it there",
                                 param="engine")
        self._fleet.console.print(f"[bold]fleet[/bold] {escape(engine)}: restart asked (status page)", highlight=False)
        owner.request_restart()

    def drain(self, engine: str, draining: bool) -> None:
        """Route no new request to one engine (or again, `draining` False); those in flight go on."""
        replica, owner = self._replica_named(engine)
        replica.draining = draining
        owner.say("draining: no new requests" if draining else "taking requests again")

    async def sleep(self, model: str) -> str:
        """Put a model started on demand away now: drained, then asleep (GPUs: vLLM's sleep mode at its
        sleep_level) or stopped (the CPU build); its state once every engine is away."""
        served, demand = self._on_demand(model)
        self._fleet.console.print(f"[bold]fleet[/bold] {escape(model)}: sleep asked", highlight=False)
        owners = demand.owners
        supervisor = self._fleet.config.supervisor
        within = supervisor.drain_timeout + supervisor.stop_grace + served.config.start_timeout
        try:
            async with asyncio.timeout(within):
                while not all(o.lifecycle.state in AWAY for o in owners):
                    demand.put_away(served.config.rest_level(idle=False))  # taken by the ready ones
                    await _any_change(owners)  # one starting now is put away once ready
        except TimeoutError:
            raise ModelNotReady(f"model {shown(model)} was not away within {within:g}s; it goes once it can",
                                retry_after=5) from None
        return closest_to_serving(o.lifecycle.state for o in owners).value

    async def wake(self, model: str) -> str:
        """Wake (or start) a model started on demand, as its next request would (making room in its
        set); its state once one of its engines serves. ModelNotReady (503) as a request would get."""
        served, _ = self._on_demand(model)
        self._fleet.console.print(f"[bold]fleet[/bold] {escape(model)}: wake asked", highlight=False)
        await served.serving()
        return served.state.value

    async def load_adapter(self, name: str, path: str, model: str | None) -> str:
        """Add a LoRA adapter to a model serving LoRA: checked as the file's are (a PEFT LoRA of this
        base, its rank within max_lora_rank, a name nobody has), then loaded by each ready engine of
        the model (one that refuses it undoes the others); until an engine restarts, which brings
        back the file's adapters only."""
        served = self._lora_model(model, "load")
        taken = {n for s in self._fleet.models.values() for n in (s.name, *s.adapters)}
        if name in taken:
            raise InvalidRequest(f"{shown(name)} is already a model or an adapter of this fleet", param="lora_name")
        cfg = served.config
        for field, problem in check_adapter(name, path, cfg.name, cfg.source, cfg.max_lora_rank):
            raise InvalidRequest(f"{field}: {problem}", param="lora_path" if field.startswith("adapters.") else field)
        owners = self._ready_owners(served)
        loaded: list[EngineOwner] = []
        try:
            for owner in owners:
                await owner.client.load_adapter(name, path)
                loaded.append(owner)
        except EngineFailure as e:
            for owner in loaded:
                with contextlib.suppress(EngineFailure, OSError):
                    await owner.client.unload_adapter(name)
            raise InvalidRequest(f"adapter {shown(name)} could not be loaded: {e}", param="lora_path") from None
        served.adapter_paths[name] = path
        self._fleet.console.print(f"[bold]fleet[/bold] {escape(served.name)}: adapter {escape(name)} loaded "
                                  f"({escape(path)})", highlight=False)
        return served.name

    async def unload_adapter(self, name: str, model: str | None) -> str:
        """Remove an adapter: out of the model's names at once (404 from now on), then out of its engines."""
        served = next((s for s in self._fleet.models.values() if name in s.adapter_paths), None)
        if served is None or (model is not None and served.name != model):
            raise ModelNotFound(f"no adapter named {shown(name)} in the fleet")
        del served.adapter_paths[name]
        for owner in self._ready_owners(served):
            with contextlib.suppress(EngineFailure, OSError):
                await owner.client.unload_adapter(name)
        self._fleet.console.print(f"[bold]fleet[/bold] {escape(served.name)}: adapter {escape(name)} unloaded",
                                  highlight=False)
        return served.name

    def _lora_model(self, model: str | None, verb: str) -> ServedModel:
        lora = [s for s in self._fleet.models.values() if s.config.serves_lora]
        if model is not None:
            served = self._fleet.models.get(model)
            if served is None:
                raise ModelNotFound(f"no model named {shown(model)} in the fleet")
            if not served.config.serves_lora:
                raise InvalidRequest(f"model {shown(model)} serves no LoRA adapters: give it `lora = true` (or "
                                     "`adapters`) in the fleet file", param="model")
            return served
        if len(lora) != 1:
            raise InvalidRequest(f"name the base model to {verb} the adapter for (`model`): "
                                 f"{'no model' if not lora else ', '.join(s.name for s in lora)} serves LoRA adapters",
                                 param="model")
        return lora[0]

    def _ready_owners(self, served: ServedModel) -> list[EngineOwner]:
        owners = self._fleet.owners
        return [owners[r.name] for r in served.replicas
                if r.name in owners and owners[r.name].lifecycle.state is EngineState.READY]

    def _on_demand(self, model: str) -> tuple[ServedModel, OnDemand]:
        served = self._fleet.models.get(model)
        if served is None:
            raise ModelNotFound(f"no model named {shown(model)} in the fleet")
        if not isinstance(served.demand, OnDemand):
            raise InvalidRequest(f"model {shown(model)} runs from launch to stop: sleep and wake apply to a model "
                                 'started on demand (start = "on_demand", a when_idle, or a member of a [[sets]] entry)',
                                 param="model")
        return served, served.demand

    def _replica_named(self, name: str) -> tuple[Replica, EngineOwner]:
        owners = self._fleet.owners
        for served in self._fleet.models.values():
            for replica in served.replicas:
                if replica.name == name and name in owners:
                    return replica, owners[name]
        raise EngineNotFound(name)

    def status(self) -> FleetStatus:
        """What `fleet status` shows: the gateway and one row per engine (per replica)."""
        now = time.monotonic()
        rows = []
        for served in self._fleet.models.values():
            for replica in served.replicas:
                owner = self._fleet.owners.get(replica.name)
                if owner is None:
                    continue
                lc = owner.lifecycle
                ready = owner.ready_at is not None and lc.state is EngineState.READY
                node, host, port, gpus = owner.runtime.where
                rows.append(ModelStatus(
                    model=served.name,
                    replica=replica.name,
                    state=lc.state,
                    reason=lc.reason,
                    gpus=gpus,
                    port=port,
                    pid=owner.pid,
                    uptime_s=round(now - owner.ready_at, 1) if ready and owner.ready_at is not None else None,
                    restarts=owner.total_restarts,
                    inflight=replica.stats.inflight,
                    requests=replica.stats.requests,
                    tokens_per_s=round(replica.stats.tokens_per_second(), 1),
                    routed=dict(replica.routed),
                    url=owner.cfg.url,
                    node=node,
                    since_s=round(now - lc.since, 1),
                    queued=served.queued,
                    errors=replica.stats.errors,
                    draining=replica.draining,
                    attached=not owner.runtime.restartable,
                    host=host,
                    on_demand=served.demand is not None,
                    swap_set=served.config.swap_set,
                    adapters={a: served.stats.adapters.get(a, 0) for a in served.adapters},
                    taken_over=served.stats.taken_over(),
                ))
        gw = self._fleet.config.gateway
        return FleetStatus(GatewayStatus(gw.host, gw.port, os.getpid(), int(self._fleet.started_at)), rows)


async def _any_change(owners: list[EngineOwner]) -> None:
    """Until one of the engines changes state."""
    waits = {asyncio.ensure_future(o.lifecycle.wait_for(*(s for s in EngineState if s is not o.lifecycle.state)))
             for o in owners}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
