"""What each replica asks of a Ray cluster, and whether the cluster has room: pure functions over
plain data (no Ray here), used by the owner to make its actor and placement group and by `fleet
check` to answer before anything starts.

A replica is one actor on one node: its CPUs and all its GPUs there (a node's GPUs share NVLink or
PCIe; vLLM's own multiprocessing runs its shards). Replicas of a model spread over nodes (Ray's
SPREAD strategy). A replica that may span nodes (`multi_node`) is a placement group instead: one
bundle per GPU, packed onto as few nodes as hold them; its first bundle also holds the engine
process, which vLLM's Ray executor needs on a node with one of its GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fleet.config.model import ModelConfig

Bundle = dict[str, float]


@dataclass(frozen=True)
class Ask:
    """What one replica asks of the cluster."""

    name: str  # the replica's
    model: str
    cpus: float  # the engine process's
    gpus: int  # all on one node; 0 for a replica across nodes (its bundles hold them)
    bundles: tuple[Bundle, ...] = ()  # a placement group's (a replica across nodes), first one the engine's
    strategy: str = "PACK"

    @property
    def spans_nodes(self) -> bool:
        return bool(self.bundles)


def replica_ask(cfg: ModelConfig, engine_cpus: float) -> Ask:
    """One replica's ask: an actor with its CPUs and GPUs; with `multi_node`, a placement group of
    one GPU per bundle (the engine's CPUs in the first), packed."""
    gpus = len(cfg.gpus)
    if cfg.multi_node and gpus:
        bundles = ({"CPU": engine_cpus, "GPU": 1.0}, *({"GPU": 1.0} for _ in range(gpus - 1)))
        return Ask(cfg.replica_name, cfg.name, engine_cpus, 0, bundles)
    return Ask(cfg.replica_name, cfg.name, engine_cpus, gpus)


@dataclass
class NodeRoom:
    """A node of the cluster and what it has free."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    resources: dict[str, float] = field(default_factory=dict)  # everything Ray counts, custom resources too


@dataclass
class Fit:
    """Where each replica would go (node ids, one per bundle or one), and what cannot be placed."""

    nodes: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def fit(asks: Sequence[Ask], nodes: Sequence[NodeRoom]) -> Fit:
    """Place every ask on the nodes' free room as Ray would (largest first; a model's replicas on
    different nodes where they can be; a replica across nodes packed onto the fewest), to say
    before anything starts whether the fleet fits."""
    room = {n.node_id: [n.cpus, n.gpus] for n in nodes}
    out = Fit()
    used_by: dict[str, set[str]] = {}  # model -> nodes it has a replica on
    for ask in sorted(asks, key=lambda a: (-(a.gpus + len(a.bundles)), -a.cpus)):
        if ask.spans_nodes:
            placed = _pack(ask.bundles, room)
            if placed is None:
                free = sum(g for _, g in room.values())
                out.problems.append(f"{ask.name} needs {len(ask.bundles)} GPUs across nodes; the cluster has "
                                    f"{free:g} free")
                continue
            out.nodes[ask.name] = placed
            continue
        fits = [nid for nid, (c, g) in room.items() if c >= ask.cpus and g >= ask.gpus]
        if not fits:
            most = max((g for _, g in room.values()), default=0)
            what = f"{ask.gpus} GPUs and {ask.cpus:g} CPUs on one node" if ask.gpus else f"{ask.cpus:g} CPUs"
            out.problems.append(f"{ask.name} needs {what}; no node has that free "
                                f"(the most free GPUs on a node: {most:g})")
            continue
        mine = used_by.setdefault(ask.model, set())
        nid = min(fits, key=lambda n: (n in mine, -room[n][1] if ask.gpus else -room[n][0]))
        room[nid][0] -= ask.cpus
        room[nid][1] -= ask.gpus
        mine.add(nid)
        out.nodes[ask.name] = [nid]
    return out


def _pack(bundles: Sequence[Bundle], room: dict[str, list[float]]) -> list[str] | None:
    """Bundles onto the nodes with the most free GPUs first (PACK); None if they do not fit."""
    trial = {nid: list(r) for nid, r in room.items()}
    order = sorted(trial, key=lambda n: -trial[n][1])
    placed = []
    for b in bundles:
        nid = next((n for n in order if trial[n][0] >= b.get("CPU", 0) and trial[n][1] >= b.get("GPU", 0)), None)
        if nid is None:
            return None
        trial[nid][0] -= b.get("CPU", 0)
        trial[nid][1] -= b.get("GPU", 0)
        placed.append(nid)
    room.update(trial)
    return placed
