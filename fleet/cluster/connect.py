"""The launcher's connection to a Ray cluster: `RayCluster`, the job that owns every replica's
actor (none is detached: when this job ends, by a stop or a SIGKILL, Ray ends its actors, and
their engines with them), and what `fleet check` asks of the cluster."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from rich.console import Console

from fleet.cluster.asks import NodeRoom, fit, replica_ask
from fleet.cluster.host import EngineHost
from fleet.cluster.runtime import RayRuntime
from fleet.config.model import ModelConfig
from fleet.config.schema import ClusterConfig, FleetConfig
from fleet.errors import ConfigError
from fleet.machine.check import CheckReport

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
    """This process's place in the cluster (ray.init), and the replicas' runtimes it makes (a
    fleet.run.runtime.Runtimes)."""

    on_this_machine = False  # each node binds its own cores; a successor may need its predecessor's room

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
        self.host: Any = ray.remote(EngineHost)  # the actor class: options per replica (runtime.py)

    def runtime(self, cfg: ModelConfig, *, env: dict[str, str], console: Console, echo_logs: bool,
                token: str | None) -> RayRuntime:
        """The runtime of one replica on the cluster (its output comes through Ray's log forwarding)."""
        return RayRuntime(cfg, cluster=self, env=env, token=token)

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


def join(config: FleetConfig, cluster: ClusterConfig, report: CheckReport, *, echo_logs: bool = True) -> RayCluster | None:
    """Join the fleet's cluster and add to `report` (what `fleet check` and `fleet launch` report
    before anything starts) where each replica fits on its nodes now, or why it does not; None,
    with the reason among the errors, when there is no cluster to join."""
    try:
        joined = RayCluster(cluster, echo_logs=echo_logs)
    except ConfigError as e:
        report.errors.append(str(e))
        return None
    asks = [replica_ask(r, cluster.engine_cpus) for m in config.models for r in m.replica_configs() if not r.attached]
    nodes = joined.nodes()
    found = fit(asks, nodes)
    report.cluster = [(a.name, found.nodes.get(a.name, [])) for a in asks]
    report.nodes = {n.node_id: n.address for n in nodes}
    report.errors += [f"[cluster] {cluster.address}: {p}" for p in found.problems]
    return joined
