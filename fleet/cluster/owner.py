"""A replica on a Ray cluster, owned from the launcher: `RayEngine`.

It is an `EngineProcess` (supervisor.py) whose engine runs on a node Ray picks, inside an
`EngineHost` actor (host.py), instead of as this machine's child: the same single owner task,
lifecycle, health checks, restart policy with backoff, drain and stop. What differs is how it
starts (place the actor, or first the placement group of a replica across nodes; then the engine
on that node's address, to which the gateway's client moves), how it learns the engine ended (the
actor's `wait`, or the actor's death: a lost node, the out-of-memory killer) and how it stops (the
actor stops the engine's process tree; then the actor and its placement group go). A restart
places the replica anew, on any node with room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from rich.console import Console
from rich.markup import escape

from fleet.cluster.host import Where
from fleet.cluster.placement import Ask, replica_ask
from fleet.config.model import ModelConfig
from fleet.config.schema import PLACEMENT_GROUP_ENV, ClusterConfig, SupervisorConfig
from fleet.gateway.status import EngineState
from fleet.run.supervisor import EngineProcess

T = TypeVar("T")


class Cluster(Protocol):
    """What a replica's owner needs of the cluster it joined (connect.RayCluster)."""

    config: ClusterConfig
    gcs_address: str  # where an engine's own Ray processes join it (a replica across nodes)
    host: Any  # the EngineHost actor class


class Unplaced(Exception):
    """A replica could not be placed and started on the cluster (the reason is the message)."""


class RayEngine(EngineProcess):
    """One replica's engine on the cluster, and the single task that owns it (a kill: the actor
    goes at once, and the engine with it)."""

    def __init__(self, cfg: ModelConfig, *, cluster: Cluster, console: Console | None = None,
                 echo_logs: bool = True, policy: SupervisorConfig | None = None, token: str | None = None,
                 engine_timeout: float = 300.0) -> None:
        super().__init__(cfg, console=console, echo_logs=echo_logs, policy=policy, token=token,
                         engine_timeout=engine_timeout)
        self.cluster = cluster
        self.ask: Ask = replica_ask(cfg, cluster.config.engine_cpus)
        self.actor: Any = None  # the EngineHost actor's handle
        self.group: Any = None  # a replica across nodes: its placement group
        self.where: Where | None = None
        self._exit: Any = None  # the actor's `wait()`: its ObjectRef
        self._end = ""

    @property
    def pid(self) -> int | None:
        """The engine's process id on its node, while it runs."""
        return self.where.pid if self.where is not None and self.actor is not None else None

    @property
    def has_engine(self) -> bool:
        return self.actor is not None or self.group is not None

    def _ending(self) -> str:
        return self._end

    def _remember_family(self) -> None:
        """Nothing to note: the engine's node-side host stops its tree."""

    async def _start(self) -> bool:
        self.lifecycle.to(EngineState.STARTING)
        self.started_at, self.ready_at = time.monotonic(), None
        self.tail.clear()
        self.where, self._end = None, ""
        self.say(f"placing on the cluster: {self._asked()}")
        try:
            where = await self._in_time(self._place())
        except Unplaced as e:
            if not self._stop.is_set():
                self._fail(str(e))
            return False
        self.where = where
        # a replica across nodes: vLLM's workers hold its GPUs, on their nodes; status keeps the file's count
        self.node, self.host, self.port = f"{where.node} ({where.node_id[:8]})", where.host, where.port
        self.gpus = where.gpus or list(self.cfg.gpus)
        await self.client.move_to(where.host, where.port)
        self._exit = self.actor.wait.remote()
        dtype = "" if self.cfg.gpus else " on the CPU"
        self.say(f"starting on node {escape(self.node)}{dtype}: pid {where.pid}, {where.host}:{where.port}"
                 + (f", GPUs {where.gpus}" if where.gpus else ""))
        return True

    async def _place(self) -> Where:
        """The actor (and first its placement group, for a replica across nodes), then its engine."""
        from ray.util import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ask, env = self.ask, dict(self.env)
        options: dict[str, Any] = {"num_cpus": ask.cpus, "num_gpus": ask.gpus, "max_restarts": 0}
        if ask.spans_nodes:
            name = f"fleet-{self.name}-{uuid.uuid4().hex[:8]}"
            self.group = placement_group(list(ask.bundles), strategy=ask.strategy, name=name)
            await self.group.ready()
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self.group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            env |= {PLACEMENT_GROUP_ENV: self.group.id.hex(), "RAY_ADDRESS": self.cluster.gcs_address}
        else:
            options["scheduling_strategy"] = "SPREAD"  # a model's replicas on different nodes where there is room
        self.actor = self.cluster.host.options(**options).remote()
        where: Where = await self.actor.start.remote(self.cfg.engine_json(), env, self.name)
        return where

    async def _in_time(self, work: Awaitable[T]) -> T:
        """`work` within what is left of the start timeout; Unplaced if the time runs out, Ray
        fails, or a stop comes first (then the stop's path removes what was made)."""
        from ray.exceptions import RayError

        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        left = self.started_at + self.cfg.start_timeout - time.monotonic()
        try:
            await asyncio.wait({task, stop}, timeout=max(left, 0), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise Unplaced("stopped while placing" if self._stop.is_set() else
                           f"the cluster had no room for it within start_timeout ({self.cfg.start_timeout:.0f}s): "
                           f"it asks {self._asked()}")
        try:
            return task.result()
        except RayError as e:
            raise Unplaced(f"could not start on the cluster: {_first_line(e)}") from None

    def _asked(self) -> str:
        ask = self.ask
        if ask.spans_nodes:
            return f"{len(ask.bundles)} GPUs packed on as few nodes as hold them"
        return f"{ask.gpus} GPU(s) and {ask.cpus:g} CPU(s) on one node" if ask.gpus else f"{ask.cpus:g} CPU(s)"

    async def _exited(self) -> None:
        """Until the engine exited (then its last log lines come over) or its actor died."""
        from ray.exceptions import RayError

        try:
            code = await self._exit
        except RayError as e:
            self._end = f"its Ray actor died: {_first_line(e)}"
            return
        self._end = f"exited with code {code}"
        with contextlib.suppress(RayError):
            self.tail.extend(await self.actor.last_lines.remote())

    async def _kill_tree(self, grace: float, *, attempts: int = 0, now: asyncio.Event | None = None) -> bool:
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
        return True

    def _address(self) -> str:
        return f"{self.where.host}:{self.where.port}" if self.where else super()._address()


def _first_line(error: BaseException) -> str:
    return str(error).strip().partition("\n")[0]
