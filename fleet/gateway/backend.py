"""One model as the gateway sees it: its settings, its replicas (each an engine with its state,
client and counts), its admission queue. The launcher builds these and owns what they point to
(the engines, their lifecycles); the gateway reads them, and picks a replica per engine request
with the model's routing policy (policies.py)."""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from fleet.api.answers import Batches
from fleet.config.model import ModelConfig
from fleet.errors import EngineUnreachable, FleetError, ModelNotReady
from fleet.gateway.admission import Admission
from fleet.gateway.metrics import BackendStats
from fleet.gateway.policies import Choice, Outcome, Policy, ReplicaLoad, choose, failover, prefix_key
from fleet.gateway.recent import TRACE
from fleet.gateway.status import EngineState
from fleet.wire import protocol
from fleet.wire.client import EngineClient

# when no replica serves, the model shows the state closest to serving
_STATE_ORDER = (EngineState.READY, EngineState.RESTARTING, EngineState.STARTING, EngineState.STOPPING,
                EngineState.FAILED, EngineState.STOPPED)


class EngineView(Protocol):
    """An engine's state as its owner keeps it (fleet.run.lifecycle.Lifecycle), read-only here."""

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
    stats: BackendStats = field(default_factory=BackendStats)
    failures: int = 0  # engine requests that failed in a row (a success resets it)
    routed: collections.Counter[str] = field(default_factory=collections.Counter)
    draining: bool = False  # takes no new requests (the status page's drain); those in flight go on

    def load(self, index: int) -> ReplicaLoad:
        serving = self.lifecycle.state.serving and not self.draining
        return ReplicaLoad(index, serving, self.stats.inflight, 0, self.failures, self.slot)


@dataclass
class ModelState:
    """A model's state over its replicas: serving when any replica serves."""

    replicas: Sequence[Replica]

    @property
    def state(self) -> EngineState:
        states = {r.lifecycle.state for r in self.replicas}
        return next((s for s in _STATE_ORDER if s in states), EngineState.STOPPED)

    @property
    def reason(self) -> str:
        state = self.state
        return next((r.lifecycle.reason for r in self.replicas if r.lifecycle.state is state and r.lifecycle.reason), "")


@dataclass
class Backend:
    """One model: its config, its replicas, its counts and admission."""

    config: ModelConfig
    replicas: list[Replica]
    stats: BackendStats = field(default_factory=BackendStats)
    admission: Admission | None = None
    rng: random.Random = field(default_factory=random.Random)

    @property
    def name(self) -> str:
        """What clients send as `model`."""
        return self.config.name

    @property
    def lifecycle(self) -> ModelState:
        """The model's state over its replicas."""
        return ModelState(self.replicas)

    @property
    def state(self) -> EngineState:
        return self.lifecycle.state

    @property
    def queued(self) -> int:
        """Requests waiting for an engine slot."""
        return self.admission.queued if self.admission else 0

    def keyed(self, key: bytes | None) -> Keyed:
        """This model as an engine whose requests carry a session key (routing = "session")."""
        return Keyed(self, key)

    def generate(self, req: protocol.GenerateRequest, key: bytes | None = None) -> Batches:
        """The frames of one engine request from the replica the policy picks (api.answers.Engine)."""
        return self._frames("/generate", req, key)

    def call(self, path: str, req: msgspec.Struct, key: bytes | None = None) -> Batches:
        """The frames of a request to another engine route (/embed, /tokenize, /detokenize), routed alike."""
        return self._frames(path, req, key)

    async def _frames(self, path: str, req: msgspec.Struct, key: bytes | None) -> Batches:
        policy = Policy(self.config.routing)
        if policy is Policy.PREFIX and key is None and isinstance(req, protocol.GenerateRequest):
            key = affinity_key(req.prompt)
        # one replica: always it (its client reports its failures, as before replicas existed)
        choice = choose(policy, self._loads(), key, self.rng) if len(self.replicas) > 1 else Choice(0, Outcome.LEAST_LOADED)
        tried: list[Replica] = []  # by identity: a rolling reload may change the list meanwhile
        while True:
            if choice is None:
                raise ModelNotReady(f"model {self.name!r} has no replica that serves; retry later", retry_after=5)
            replica = self.replicas[choice.index]
            replica.routed[choice.outcome] += 1
            replica.stats.begin()
            trace = TRACE.get()
            if trace is not None:
                trace.served_by(replica.name)
            try:
                async for batch in replica.client.frames(path, req):
                    last = batch[-1]
                    if isinstance(last, protocol.Done):
                        replica.stats.add_tokens(last.completion_tokens, last.prompt_tokens)
                        if trace is not None:
                            trace.prompt_tokens += last.prompt_tokens
                            trace.completion_tokens += last.completion_tokens
                    elif isinstance(last, protocol.Error) and last.status >= 500:  # the engine failed it
                        replica.stats.errors += 1
                    yield batch
                replica.failures = 0
                return
            except EngineUnreachable:
                # nothing was sent (no connection opened): another replica may take it
                replica.failures += 1
                replica.stats.errors += 1
                tried.append(replica)
                choice = failover(self._loads(), {i for i, r in enumerate(self.replicas) if r in tried}, self.rng)
                if choice is None:
                    raise
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

    def _loads(self) -> list[ReplicaLoad]:
        return [r.load(i) for i, r in enumerate(self.replicas)]

    def count_tokens(self, completion: int, prompt: int) -> None:
        """Tokens of one finished engine request (api.answers.Engine)."""
        self.stats.add_tokens(completion, prompt)


@dataclass
class Keyed:
    """A backend whose engine requests carry one session key."""

    backend: Backend
    key: bytes | None

    def generate(self, req: protocol.GenerateRequest) -> Batches:
        return self.backend.generate(req, self.key)

    def call(self, path: str, req: msgspec.Struct) -> Batches:
        return self.backend.call(path, req, self.key)

    def count_tokens(self, completion: int, prompt: int) -> None:
        self.backend.count_tokens(completion, prompt)


def affinity_key(prompt: str | list[int] | protocol.Chat) -> bytes:
    """A prompt's prefix-routing key: its leading text, a chat's messages in order, or its token ids."""
    if isinstance(prompt, str):
        return prefix_key(prompt)
    if isinstance(prompt, protocol.Chat):
        return prefix_key("".join(f"<{m.role}>{m.content}" for m in prompt.messages))
    return b"ids:" + b",".join(str(t).encode() for t in prompt[:64])
