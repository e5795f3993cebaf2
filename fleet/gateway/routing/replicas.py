"""A model's replicas as routing sees them (`Replica`: an engine's state, client and counts), the
state a model shows over them, and `routed`: one engine request sent to the replica the model's
policy picks, and to another when that one refuses it before any work began (failover).

Failover is bounded: a replica is tried at most once per request. A request the engine never began
(no connection opened, or it ended before the first byte of the answer: errors.EngineUnreachable)
moves on; so does one whose engine died under it (errors.EngineLost: run again, or continued where
its stream stopped: resume.py); any other failure is the request's answer.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from fleet.api.answers import Batches
from fleet.config.model import RoutingPolicy
from fleet.errors import EngineLost, EngineUnreachable, FleetError, ModelNotReady, RequestGivenUp
from fleet.gateway.metrics import ModelCounts, ReplicaCounts
from fleet.gateway.recent import TRACE
from fleet.gateway.routing.keys import affinity_key
from fleet.gateway.routing.policies import Choice, Outcome, ReplicaLoad, adapter_affinity, choose, failover
from fleet.gateway.routing.resume import Progress, after_death
from fleet.lifecycle import EngineState, closest_to_serving
from fleet.wire import protocol
from fleet.wire.client import EngineClient


class EngineView(Protocol):
    """An engine's state as its owner keeps it (fleet.lifecycle.Lifecycle), read-only here."""

    @property
    def state(self) -> EngineState: ...

    @property
    def reason(self) -> str: ...


@dataclass(eq=False)  # a replica is itself: `in` and `==` by identity
class Replica:
    """One engine of a model: its name in status and metrics, its state, its client, its counts
    (engine requests in flight and done, tokens) and how requests were routed to it."""

    name: str
    lifecycle: EngineView
    client: EngineClient
    slot: int = 0  # its number among the model's replicas (prefix and session keys hash on it)
    stats: ReplicaCounts = field(default_factory=ReplicaCounts)
    failures: int = 0  # engine requests that failed in a row (a success resets it)
    routed: collections.Counter[str] = field(default_factory=collections.Counter)
    draining: bool = False  # takes no new requests (the status page's drain); those in flight go on
    adapters: collections.OrderedDict[str, None] = field(default_factory=collections.OrderedDict)  # sent here, LRU first

    def load(self, index: int) -> ReplicaLoad:
        serving = self.lifecycle.state.serving and not self.draining
        return ReplicaLoad(index, serving, self.stats.inflight, self.failures, self.slot, tuple(self.adapters))

    def hold(self, adapter: str, slots: int) -> str | None:
        """Record that `adapter` is (now) loaded here, most recently used; the one dropped beyond `slots`."""
        self.adapters[adapter] = None
        self.adapters.move_to_end(adapter)
        if len(self.adapters) > slots:
            return self.adapters.popitem(last=False)[0]
        return None


def state_of(replicas: Sequence[Replica]) -> EngineState:
    """A model's state over its replicas: the one closest to serving."""
    return closest_to_serving(r.lifecycle.state for r in replicas)


def reason_of(replicas: Sequence[Replica]) -> str:
    """Why a model is in its state: the first such replica's reason."""
    state = state_of(replicas)
    return next((r.lifecycle.reason for r in replicas if r.lifecycle.state is state and r.lifecycle.reason), "")


def loads(replicas: Sequence[Replica]) -> list[ReplicaLoad]:
    return [r.load(i) for i, r in enumerate(replicas)]


async def routed(model: str, replicas: Sequence[Replica], policy: RoutingPolicy, rng: random.Random, path: str,
                 req: msgspec.Struct, key: bytes | None, slots: int = 1, counts: ModelCounts | None = None) -> Batches:
    """The frames of one engine request to `path` from the replica `policy` picks (a prompt's prefix
    its key under the prefix policy, unless the request carries one), failing over as above, and
    taken over by another replica when its engine dies under it (resume.py; counted in `counts`).
    `replicas` is the model's live list: a rolling reload may change it meanwhile."""
    if policy is RoutingPolicy.PREFIX and key is None and isinstance(req, protocol.GenerateRequest):
        key = affinity_key(req.prompt)
    adapter = req.adapter if isinstance(req, protocol.GenerateRequest) else None
    # one replica: always it (its client reports its failures, as before replicas existed)
    if len(replicas) == 1:
        choice: Choice | None = Choice(0, Outcome.LEAST_LOADED)
    elif adapter is not None:  # where the adapter is loaded (its own policy, whatever the model's)
        choice = adapter_affinity(loads(replicas), adapter, slots)
    else:
        choice = choose(policy, loads(replicas), key, rng)
    tried: list[Replica] = []  # by identity
    died_on: list[str] = []  # replicas whose engine died under this request
    progress = Progress()  # what the caller has, should an engine die under it
    sending = req  # what goes to the next replica: the request, or its continuation
    while True:
        if choice is None:
            raise ModelNotReady(f"model {model!r} has no replica that serves; retry later", retry_after=5)
        replica = replicas[choice.index]
        replica.routed[choice.outcome] += 1
        if adapter is not None and len(replicas) > 1 and replica.hold(adapter, slots) is not None:
            replica.routed[Outcome.ADAPTER_EVICTED] += 1
        replica.stats.begin()
        trace = TRACE.get()
        if trace is not None:
            trace.served_by(replica.name)
        try:
            async for batch in replica.client.frames(path, sending):
                last = batch[-1]
                lost = None  # vLLM's core died under it: the engine is lost, as if its process had
                if isinstance(last, protocol.Done):
                    replica.stats.add_tokens(last.completion_tokens, last.prompt_tokens)
                elif isinstance(last, protocol.Error):
                    if last.status == protocol.ENGINE_DIED:
                        lost, batch = last, batch[:-1]
                    elif last.status >= 500:  # the engine failed it
                        replica.stats.errors += 1
                if died_on:
                    batch = progress.carry(batch)
                    last = batch[-1] if batch else last
                progress.saw(batch)
                if isinstance(last, protocol.Done) and trace is not None:
                    trace.prompt_tokens += last.prompt_tokens
                    trace.completion_tokens += last.completion_tokens
                if batch:
                    yield batch
                if lost is not None:
                    raise EngineLost(lost.message)
            replica.failures = 0
            return
        except EngineUnreachable:
            # nothing was sent (no connection opened): another replica may take it
            replica.failures += 1
            replica.stats.errors += 1
            tried.append(replica)
            choice = failover(loads(replicas), {i for i, r in enumerate(replicas) if r in tried}, rng)
            if choice is None:
                raise
        except EngineLost as e:  # the engine died under it: another replica takes it over (resume.py)
            replica.failures += 1
            replica.stats.errors += 1
            tried.append(replica)
            died_on.append(replica.name)
            try:
                after = after_death(req, progress, died_on)
                if isinstance(after, protocol.Done):  # it had finished: only its Done was lost
                    yield [after]
                    return
                sending = after
                choice = failover(loads(replicas), {i for i, r in enumerate(replicas) if r in tried}, rng)
                if choice is None:
                    raise RequestGivenUp(f"{e.message}, and no other replica of model {model!r} serves to take the "
                                         "request over") from None
            except RequestGivenUp:
                if counts is not None:
                    counts.given_up += 1
                raise
            if counts is not None:
                if progress.continuing:
                    counts.resumed += 1
                else:
                    counts.rerun += 1
        except Exception as e:
            replica.failures += 1
            if not isinstance(e, FleetError) or e.status >= 500:  # a refused request is not the replica's failure
                replica.stats.errors += 1
            raise
        except BaseException:  # the client went away: not the replica's failure
            replica.failures += 1
            raise
        finally:
            replica.stats.end()
