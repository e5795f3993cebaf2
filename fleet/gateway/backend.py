"""One model as the gateway sees it: its settings, its engine's state, its client, its counts and
its admission queue. The launcher builds these and owns what they point to; the gateway reads them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fleet.api.answers import Batches
from fleet.config.schema import ModelConfig
from fleet.gateway.admission import Admission
from fleet.gateway.metrics import BackendStats
from fleet.gateway.status import EngineState
from fleet.wire import protocol
from fleet.wire.client import EngineClient


class EngineView(Protocol):
    """An engine's state as its owner keeps it (fleet.run.lifecycle.Lifecycle), read-only here."""

    @property
    def state(self) -> EngineState: ...

    @property
    def reason(self) -> str: ...


@dataclass
class Backend:
    """One model: its config, its engine's lifecycle (owned by the launcher), its client."""

    config: ModelConfig
    lifecycle: EngineView
    client: EngineClient
    stats: BackendStats = field(default_factory=BackendStats)
    admission: Admission | None = None

    @property
    def name(self) -> str:
        """What clients send as `model`."""
        return self.config.name

    @property
    def state(self) -> EngineState:
        """The engine's state."""
        return self.lifecycle.state

    @property
    def queued(self) -> int:
        """Requests waiting for an engine slot."""
        return self.admission.queued if self.admission else 0

    def generate(self, req: protocol.GenerateRequest) -> Batches:
        """The engine's frames for one request (api.answers.Engine)."""
        return self.client.generate(req)

    def count_tokens(self, completion: int, prompt: int) -> None:
        """Tokens of one finished engine request (api.answers.Engine)."""
        self.stats.add_tokens(completion, prompt)
