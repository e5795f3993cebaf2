"""Which replica of a model takes a request: pure functions over the replicas' live state.

Each policy gets a snapshot (`ReplicaLoad` per replica: serving or not, engine requests in flight,
recent failures) and returns a `Choice` (which replica, and why) or None when no replica
serves. Nothing here keeps state between requests: no round-robin counter (one shared across models
skews them all), no load counters of its own (counters that a health check resets lie); the caller
reads the live counts of each replica's owner. Randomness comes in as an argument, so tests are exact.

- `least_loaded`: fewest engine requests in flight; with more than `SAMPLED_ABOVE` replicas,
  the better of two picked at random (the power of two choices: nearly as even, and no herd onto
  the one replica that just looked least loaded to every gateway task at once).
- `bounded_affinity`: requests with the same key (a prompt's leading part, keys.affinity_key) go to the
  same replica so vLLM's prefix cache hits, unless that replica holds more than `bound` times the
  mean load; then the key's next replica takes it. Every key has its own order of replicas
  (rendezvous hashing), so a spilled or missed key lands anywhere, not always on one replica, and a
  replica leaving moves only its own keys. This is consistent hashing with bounded loads (Mirrokni,
  Thorup and Zadimoghaddam, 2018) on a rendezvous ring.
- `sticky`: the `session` policy: the same key (the request's `user`, or a header the fleet file
  names) stays on one replica while it serves, whatever the load.
- `adapter_affinity`: a request for a LoRA adapter (whatever the model's policy) goes to a replica
  that holds the adapter, the least loaded of them, while it is under the load bound; otherwise the
  adapter is loaded on the least loaded replica (one with a free adapter slot first; a full one
  evicts its least recently used adapter). What a replica holds is the gateway's record of where it
  sent each adapter (its engine keeps `max_loras` of them at once, least recently used out first).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from fleet.config.model import RoutingPolicy as Policy  # the names, defined once with the fleet file's field

SAMPLED_ABOVE = 4  # replicas; up to this many, least_loaded looks at all of them
LOAD_BOUND = 1.25  # bounded_affinity: at most this times the mean load (+1) per replica


class Outcome(StrEnum):
    """Why a replica was chosen (counted per replica in /metrics)."""

    LEAST_LOADED = "least_loaded"
    AFFINITY = "affinity"  # the key's own replica
    SPILLED = "spilled"  # the key's replica was over the load bound (or not serving)
    FAILED_OVER = "failed_over"  # a retry after a replica refused the request
    ADAPTER_HIT = "adapter_hit"  # a replica that holds the request's LoRA adapter
    ADAPTER_LOADED = "adapter_loaded"  # the adapter is loaded there for this request (none holds it under the bound)
    ADAPTER_EVICTED = "adapter_evicted"  # counted beside the above: a full replica dropped its least recently used


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the policy sees it at the moment of the decision."""

    index: int
    serving: bool
    load: int = 0  # engine requests in flight (a model's queue is the model's, before any replica: admission.py)
    recent_failures: int = 0
    slot: int | None = None  # the replica's own number (its name's k): keys stay put when a reload reorders the list
    adapters: tuple[str, ...] = ()  # the LoRA adapters it holds, least recently used first


@dataclass(frozen=True)
class Choice:
    index: int
    outcome: Outcome
    evicts: str | None = None  # the adapter the chosen replica drops to load the request's


def least_loaded(replicas: Sequence[ReplicaLoad], rng: random.Random) -> Choice | None:
    """The serving replica with the least load (then the fewest recent failures), ties at random;
    with many replicas, the better of two sampled at random."""
    serving = [r for r in replicas if r.serving]
    if not serving:
        return None
    if len(serving) > SAMPLED_ABOVE:
        serving = rng.sample(serving, 2)
    best = min((r.load, r.recent_failures) for r in serving)
    tied = [r for r in serving if (r.load, r.recent_failures) == best]
    return Choice(rng.choice(tied).index, Outcome.LEAST_LOADED)


def preference(key: bytes, replicas: Sequence[ReplicaLoad]) -> list[ReplicaLoad]:
    """The replicas in `key`'s own order (rendezvous hashing: highest hash of key and replica first)."""
    def weight(r: ReplicaLoad) -> bytes:
        slot = r.index if r.slot is None else r.slot
        return hashlib.blake2b(key + slot.to_bytes(4, "little"), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


def bounded_affinity(replicas: Sequence[ReplicaLoad], key: bytes, bound: float = LOAD_BOUND) -> Choice | None:
    """The first serving replica in `key`'s order whose load is under the bound:
    ceil(bound x (total load + 1) / serving replicas)."""
    serving = [r for r in replicas if r.serving]
    if not serving:
        return None
    cap = math.ceil(bound * (sum(r.load for r in serving) + 1) / len(serving))
    order = preference(key, replicas)
    first = True
    for r in order:
        if r.serving and r.load < cap:
            return Choice(r.index, Outcome.AFFINITY if first else Outcome.SPILLED)
        first = False
    return None  # unreachable: the least loaded serving replica is always under the cap


def sticky(replicas: Sequence[ReplicaLoad], key: bytes) -> Choice | None:
    """The first serving replica in `key`'s order, whatever its load."""
    for k, r in enumerate(preference(key, replicas)):
        if r.serving:
            return Choice(r.index, Outcome.AFFINITY if k == 0 else Outcome.SPILLED)
    return None


def adapter_affinity(replicas: Sequence[ReplicaLoad], adapter: str, slots: int,
                     bound: float = LOAD_BOUND) -> Choice | None:
    """The replica for a request naming a LoRA adapter: the least loaded serving replica that holds it
    while under ceil(bound x (total load + 1) / serving replicas); else the least loaded serving
    replica loads it (a free slot before a full one, which evicts its least recently used)."""
    serving = [r for r in replicas if r.serving]
    if not serving:
        return None
    cap = math.ceil(bound * (sum(r.load for r in serving) + 1) / len(serving))
    holders = [r for r in serving if adapter in r.adapters and r.load < cap]
    if holders:
        best = min(holders, key=lambda r: (r.load, r.recent_failures, r.index))
        return Choice(best.index, Outcome.ADAPTER_HIT)
    best = min(serving, key=lambda r: (r.load, len(r.adapters) >= slots, r.recent_failures, r.index))
    full = len(best.adapters) >= slots and adapter not in best.adapters
    return Choice(best.index, Outcome.ADAPTER_LOADED, best.adapters[0] if full and best.adapters else None)


def choose(policy: Policy, replicas: Sequence[ReplicaLoad], key: bytes | None, rng: random.Random) -> Choice | None:
    """The replica for one request under `policy`; without a key, least loaded."""
    if key is None or policy is Policy.LEAST_LOADED:
        return least_loaded(replicas, rng)
    if policy is Policy.PREFIX:
        return bounded_affinity(replicas, key)
    return sticky(replicas, key)


def failover(replicas: Sequence[ReplicaLoad], tried: set[int], rng: random.Random) -> Choice | None:
    """Another serving replica for a request that `tried` refused before any work began."""
    left = [r for r in replicas if r.index not in tried]
    choice = least_loaded(left, rng)
    return None if choice is None else Choice(choice.index, Outcome.FAILED_OVER)
