"""A replica's engine on a Ray cluster, as its owner (fleet.run.owner.EngineOwner) drives it:
`RayRuntime`.

The same owner task, lifecycle, health checks, restart policy with backoff, drain and stop as for
an engine of this machine; what differs is here: how it starts (place the `EngineHost` actor
(host.py), or first the placement group of a replica across nodes; then the engine on that node's
address, to which the owner's client moves), how it learns the engine ended (the actor's `wait`,
or the actor's death: a lost node, the out-of-memory killer) and how it stops (the actor stops the
engine's process tree; then the actor and its placement group go). A restart places the replica
anew, on any node with room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from rich.markup import escape

from fleet.cluster.asks import Ask, replica_ask
from fleet.cluster.host import LOG_TAIL, Where
from fleet.config.model import ModelConfig
from fleet.config.schema import ENGINE_TOKEN_ENV, PLACEMENT_GROUP_ENV, ClusterConfig
from fleet.run.runtime import Address, StartFailed, Voice
from fleet.wire.client import EngineClient

T = TypeVar("T")


class Cluster(Protocol):
    """What a replica's runtime needs of the cluster it joined (connect.RayCluster)."""

    config: ClusterConfig
    gcs_address: str  # where an engine's own Ray processes join it (a replica across nodes)
    host: Any  # the EngineHost actor class


class RayRuntime:
    """One replica's engine on the cluster (a kill: the actor goes at once, and the engine with it)."""

    restartable = True
    unix_socket = None  # on a node of the cluster, reached at its address

    def __init__(self, cfg: ModelConfig, *, cluster: Cluster, env: dict[str, str] | None = None,
                 token: str | None = None) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.env = {**(env or {}), **({ENGINE_TOKEN_ENV: token} if token else {})}
        self.ask: Ask = replica_ask(cfg, cluster.config.engine_cpus)
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self.actor: Any = None  # the EngineHost actor's handle
        self.group: Any = None  # a replica across nodes: its placement group
        self.placed: Where | None = None
        self._exit: Any = None  # the actor's `wait()`: its ObjectRef
        self._voice: Voice | None = None

    @property
    def pid(self) -> int | None:
        """The engine's process id on its node, while it runs."""
        return self.placed.pid if self.placed is not None and self.actor is not None else None

    @property
    def where(self) -> tuple[str | None, str, int, list[int]]:
        """Its node and address once placed (a replica across nodes: vLLM's workers hold its GPUs, on
        their nodes; status keeps the file's count); the file's until then."""
        if self.placed is None:
            return None, self.cfg.host, self.cfg.port, list(self.cfg.gpus)
        w = self.placed
        return f"{w.node} ({w.node_id[:8]})", w.host, w.port, w.gpus or list(self.cfg.gpus)

    @property
    def has_engine(self) -> bool:
        return self.actor is not None or self.group is not None

    def bind(self, voice: Voice) -> None:
        self._voice = voice

    def _say(self, message: str) -> None:
        if self._voice is not None:
            self._voice.say(message)

    async def start(self, deadline: float, stopping: asyncio.Event) -> Address | None:
        self.tail.clear()
        self.placed = None
        self._say(f"placing on the cluster: {self._asked()}")
        where = await self._in_time(self._place(), deadline, stopping)
        self.placed = where
        self._exit = self.actor.wait.remote()
        node = self.where[0] or ""
        dtype = "" if self.cfg.gpus else " on the CPU"
        self._say(f"starting on node {escape(node)}{dtype}: pid {where.pid}, {where.host}:{where.port}"
                  + (f", GPUs {where.gpus}" if where.gpus else ""))
        return where.host, where.port

    async def _place(self) -> Where:
        """The actor (and first its placement group, for a replica across nodes), then its engine."""
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ask, env = self.ask, dict(self.env)
        options: dict[str, Any] = {"num_cpus": ask.cpus, "num_gpus": ask.gpus, "max_restarts": 0}
        if ask.spans_nodes:
            name = f"fleet-{self.cfg.replica_name}-{uuid.uuid4().hex[:8]}"
            self.group = placement_group(list(ask.bundles), strategy=ask.strategy, name=name)
            await self.group.ready()
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            env |= {PLACEMENT_GROUP_ENV: self.group.id.hex(), "RAY_ADDRESS": self.cluster.gcs_address}
        else:
            options["scheduling_strategy"] = "SPREAD"  # a model's replicas on different nodes where there is room
        self.actor = self.cluster.host.options(**options).remote()
        where: Where = await self.actor.start.remote(self.cfg.engine_json(), env, self.cfg.replica_name)
        return where

    async def _in_time(self, work: Awaitable[T], deadline: float, stopping: asyncio.Event) -> T:
        """`work` by `deadline`; StartFailed if the time runs out, Ray fails, or a stop comes first
        (then the stop's path removes what was made)."""
        from ray.exceptions import RayError

        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(stopping.wait())
        try:
            await asyncio.wait({task, stop}, timeout=max(deadline - time.monotonic(), 0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise StartFailed("stopped while placing" if stopping.is_set() else
                              f"the cluster had no room for it within start_timeout ({self.cfg.start_timeout:.0f}s): "
                              f"it asks {self._asked()}")
        try:
            return task.result()
        except RayError as e:
            raise StartFailed(f"could not start on the cluster: {_first_line(e)}") from None

    def _asked(self) -> str:
        ask = self.ask
        if ask.spans_nodes:
            return f"{len(ask.bundles)} GPUs packed on as few nodes as hold them"
        return f"{ask.gpus} GPU(s) and {ask.cpus:g} CPU(s) on one node" if ask.gpus else f"{ask.cpus:g} CPU(s)"

    def notice(self) -> None:
        """Nothing to note: the engine's node-side host stops its tree."""

    async def ended(self) -> str:
        """Until the engine exited or its actor died."""
        from ray.exceptions import RayError

        try:
            code = await self._exit
        except RayError as e:
            return f"its Ray actor died: {_first_line(e)}"
        return f"exited with code {code}"

    async def last_words(self) -> None:
        """The engine's last log lines, from its node (none when its actor died with it)."""
        from ray.exceptions import RayError

        with contextlib.suppress(RayError):
            self.tail.extend(await self.actor.last_lines.remote())

    async def check(self, client: EngineClient, within: float) -> str | None:
        return None if await client.healthy(timeout=within) else "the engine does not answer /health"

    async def stop(self, grace: float, now: asyncio.Event | None) -> None:
        """The engine's tree stopped by its host (SIGTERM, SIGKILL after `grace`; skipped for a
        kill), then the actor and any placement group removed. Ray kills an actor's children as it
        goes, and the engine asked for SIGTERM at its parent's death: nothing is left either way."""
        import ray
        from ray.exceptions import RayError

        actor, group, self.actor, self.group = self.actor, self.group, None, None
        if actor is not None:
            if now is None or not now.is_set():
                with contextlib.suppress(RayError, TimeoutError):
                    async with asyncio.timeout(grace + 10):
                        await actor.stop.remote(grace)
            with contextlib.suppress(RayError, ValueError):
                ray.kill(actor, no_restart=True)
        if group is not None:
            with contextlib.suppress(RayError, ValueError):
                ray.util.remove_placement_group(group)

    async def close(self) -> None:
        pass

    def ready_line(self, took: float) -> str:
        w = self.placed
        where = f"{w.host}:{w.port}" if w else f"{self.cfg.host}:{self.cfg.port}"
        return f"[green]ready[/green] in {took:.1f}s on {where}"

    @property
    def gone_line(self) -> str:
        return "stopped"


def _first_line(error: BaseException) -> str:
    return str(error).strip().partition("\n")[0]
