"""The launcher's connection to a Ray cluster: `RayCluster`, the job that owns every replica's
actor (none is detached: when this job ends, by a stop or a SIGKILL, Ray ends its actors, and
their engines with them), and what `fleet check` asks of the cluster."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from rich.console import Console

from fleet.cluster.host import EngineHost
from fleet.cluster.owner import RayEngine
from fleet.cluster.placement import NodeRoom, fit, replica_ask
from fleet.config.model import ModelConfig
from fleet.config.placement import Placement
from fleet.config.schema import ClusterConfig, FleetConfig, SupervisorConfig
from fleet.errors import ConfigError

CONNECT_TIMEOUT = 5.0


def check_reachable(address: str) -> None:
    """ConfigError, at once, unless something answers at the cluster's head (ray.init itself would
    retry for minutes at an address where nothing listens, or at a stale "auto" one)."""
    if address.startswith("ray://"):
        return  # Ray Client: its own connect fails fast enough
    from ray._private.services import canonicalize_bootstrap_address

    try:
        target = canonicalize_bootstrap_address(address)
    except (ValueError, ConnectionError) as e:
        raise ConfigError(f"[cluster] address {address!r}: {e}") from None
    if target is None:
        raise ConfigError(f"[cluster] address {address!r}: no Ray cluster found on this machine; start one with "
                          "`ray start --head` (docs/cluster.md)")
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"[cluster] address {address!r}: nothing answers at {target} ({e}); is `ray start --head` "
                          "running there? (docs/cluster.md)") from None


class RayCluster:
    """This process's place in the cluster (ray.init), and the replicas' owners it makes."""

    def __init__(self, config: ClusterConfig, *, echo_logs: bool = True) -> None:
        import ray

        self.config = config
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # each engine's lines, not "[repeated 2x across cluster]"
        check_reachable(config.address)
        try:
            ray.init(address=config.address, namespace=config.namespace, log_to_driver=echo_logs,
                               logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ConfigError(f"[cluster] address {config.address!r}: no Ray cluster there ({e}); start one with "
                              "`ray start --head` (docs/cluster.md)") from None
        self.gcs_address: str = ray.get_runtime_context().gcs_address
        self.host: Any = ray.remote(EngineHost)  # the actor class: options per replica (owner.py)

    def engine(self, cfg: ModelConfig, *, console: Console | None = None, echo_logs: bool = True,
               policy: SupervisorConfig | None = None, token: str | None = None,
               engine_timeout: float = 300.0) -> RayEngine:
        """The owner of one replica on the cluster (launcher.Fleet starts its task)."""
        return RayEngine(cfg, cluster=self, console=console, echo_logs=echo_logs, policy=policy, token=token,
                         engine_timeout=engine_timeout)

    def nodes(self) -> list[NodeRoom]:
        """The live nodes and what each has free now."""
        import ray
        from ray._private.state import available_resources_per_node

        free = available_resources_per_node()
        rooms = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            have = free.get(n["NodeID"], {})
            rooms.append(NodeRoom(n["NodeID"], n["NodeManagerAddress"], have.get("CPU", 0.0), have.get("GPU", 0.0),
                                  dict(n.get("Resources", {}))))
        return rooms

    def close(self) -> None:
        """Leave the cluster: Ray ends what this job still owns."""
        import ray

        ray.shutdown()


def join(config: FleetConfig, cluster: ClusterConfig, placement: Placement, *, echo_logs: bool = True) -> RayCluster | None:
    """Join the fleet's cluster and add to `placement` (what `fleet check` and `fleet launch` report
    before anything starts) where each replica fits on its nodes now, or why it does not; None,
    with the reason among the errors, when there is no cluster to join."""
    try:
        joined = RayCluster(cluster, echo_logs=echo_logs)
    except ConfigError as e:
        placement.errors.append(str(e))
        return None
    asks = [replica_ask(r, cluster.engine_cpus) for m in config.models for r in m.replica_configs() if not r.attached]
    nodes = joined.nodes()
    found = fit(asks, nodes)
    placement.cluster = [(a.name, found.nodes.get(a.name, [])) for a in asks]
    placement.nodes = {n.node_id: n.address for n in nodes}
    placement.errors += [f"[cluster] {cluster.address}: {p}" for p in found.problems]
    return joined
