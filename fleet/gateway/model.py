"""One model as the gateway serves it (`ServedModel`): its settings, its replicas, its counts of
client requests, its admission queue. The launcher builds these and owns what they point to (the
engines' owners and lifecycles); the gateway reads them, and sends each engine request through
routing (fleet/gateway/routing/)."""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from fleet.api.answers import Batches
from fleet.config.model import ModelConfig
from fleet.errors import ModelNotReady
from fleet.gateway.admission import Admission
from fleet.gateway.metrics import ModelCounts
from fleet.gateway.routing.replicas import Replica, reason_of, routed, state_of
from fleet.lifecycle import EngineState
from fleet.wire import protocol


class Demand(Protocol):
    """A model whose engines start on its requests (fleet.run.demand.OnDemand)."""

    waiting: int  # requests waiting now
    starts: int  # starts asked by requests
    waited_seconds: float  # all requests' waits together
    swapped_out: int  # times its set put it away for another member

    @property
    def set_name(self) -> str | None:
        """Its [[sets]] entry, if any."""
        ...

    @property
    def wakes(self) -> int:
        """Its engines' wakes from sleep."""
        ...

    @property
    def wake_seconds(self) -> float:
        """Seconds its engines took to wake, all together."""
        ...

    @property
    def start_seconds(self) -> float:
        """Seconds its engines took to start (to ready), all together."""
        ...

    async def ready(self) -> None:
        """Return once one of its engines serves (starting them if need be); ModelNotReady (503) when
        they do not come up."""
        ...


@dataclass
class ServedModel:
    """One model: its config, its replicas, its counts and admission."""

    config: ModelConfig
    replicas: list[Replica]
    stats: ModelCounts = field(default_factory=ModelCounts)
    admission: Admission | None = None
    rng: random.Random = field(default_factory=random.Random)
    demand: Demand | None = None  # on demand: a request waits for its engines to start (run/demand.py)
    adapter_paths: dict[str, str] = field(default_factory=dict)  # its LoRA adapters now: the file's and those loaded since

    def __post_init__(self) -> None:
        self.adapter_paths = {**self.config.adapters, **self.adapter_paths}

    @property
    def name(self) -> str:
        """What clients send as `model`."""
        return self.config.name

    @property
    def state(self) -> EngineState:
        """The model's state over its replicas: the one closest to serving."""
        return state_of(self.replicas)

    @property
    def reason(self) -> str:
        return reason_of(self.replicas)

    async def serving(self) -> None:
        """Return once the model serves: at once if a replica does; a model started on demand waits
        for its engines (started for it); any other is a 503 with the state's Retry-After."""
        state = self.state
        if state.serving:
            return
        if self.demand is not None:
            await self.demand.ready()
            return
        why = f": {self.reason}" if self.reason and state is EngineState.FAILED else ""
        raise ModelNotReady(f"model {self.name!r} is not ready (engine {state.value}{why}); retry later",
                            retry_after=state.retry_after)

    @property
    def queued(self) -> int:
        """Requests waiting for an engine slot."""
        return self.admission.queued if self.admission else 0

    @property
    def adapters(self) -> Collection[str]:
        """The names of its LoRA adapters (each a model name of its own to clients)."""
        return self.adapter_paths.keys()

    def keyed(self, key: bytes | None, adapter: str | None = None) -> Keyed:
        """This model as the target of requests that carry a session key (routing = "session"), or
        that name one of its adapters."""
        return Keyed(self, key, adapter)

    def generate(self, req: protocol.GenerateRequest, key: bytes | None = None) -> Batches:
        """The frames of one engine request from the replica routing picks (api.answers.FrameSource)."""
        return routed(self.name, self.replicas, self.config.routing, self.rng, "/generate", req, key,
                      self.config.max_loras, self.stats)

    def call(self, path: str, req: msgspec.Struct, key: bytes | None = None) -> Batches:
        """The frames of a request to another engine route (/embed, /tokenize, /detokenize), routed alike."""
        return routed(self.name, self.replicas, self.config.routing, self.rng, path, req, key, counts=self.stats)

    def count_tokens(self, completion: int, prompt: int) -> None:
        """Tokens of one finished engine request (api.answers.FrameSource)."""
        self.stats.add_tokens(completion, prompt)


@dataclass
class Keyed:
    """A model whose engine requests carry one session key, or name one of its adapters."""

    model: ServedModel
    key: bytes | None
    adapter: str | None = None

    def generate(self, req: protocol.GenerateRequest) -> Batches:
        if self.adapter is not None:
            req.adapter = self.adapter
        return self.model.generate(req, self.key)

    def call(self, path: str, req: msgspec.Struct) -> Batches:
        return self.model.call(path, req, self.key)

    def count_tokens(self, completion: int, prompt: int) -> None:
        self.model.count_tokens(completion, prompt)
