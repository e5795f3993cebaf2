"""Which engine takes a request: a pure decision over the fleet's backends, testable without processes."""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleet.admission import Admission
from fleet.client import EngineClient
from fleet.config import ModelConfig
from fleet.errors import ModelNotFound, ModelNotReady
from fleet.lifecycle import EngineState, Lifecycle

RETRY_AFTER = {EngineState.STARTING: 10, EngineState.RESTARTING: 10, EngineState.FAILED: 30}


TOKEN_RATE_WINDOW = 10.0  # seconds over which `tokens_per_second` averages


@dataclass
class BackendStats:
    """What the gateway counts per model: requests in flight (drained on reload), totals, token rate."""

    inflight: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    responses: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    _recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def begin(self) -> None:
        """A request for this model started."""
        self.inflight += 1
        self.requests += 1

    def end(self) -> None:
        """A request for this model finished, however it ended."""
        self.inflight -= 1

    def count(self, route: str, status: int) -> None:
        """One answered request, by route and HTTP status."""
        self.responses[(route, status)] += 1

    def add_tokens(self, n: int, prompt: int = 0) -> None:
        """Tokens of one finished engine request: completion (for the rate) and prompt."""
        self.prompt_tokens += prompt
        self.completion_tokens += n
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - TOKEN_RATE_WINDOW:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Completion tokens per second over the last few seconds."""
        now = time.monotonic()
        return sum(n for t, n in self._recent if t >= now - TOKEN_RATE_WINDOW) / TOKEN_RATE_WINDOW


@dataclass
class Backend:
    """One model as the gateway sees it: its config, its lifecycle (owned by the launcher), its client."""

    config: ModelConfig
    lifecycle: Lifecycle
    client: EngineClient
    stats: BackendStats = field(default_factory=BackendStats)
    admission: Admission | None = None

    @property
    def name(self) -> str:
        """What clients send as `model`."""
        return self.config.name


def route(backends: Mapping[str, Backend], model: str) -> Backend:
    """The backend serving `model`; 404 if the fleet has no such model, 503 if it is not ready."""
    backend = backends.get(model)
    if backend is None:
        known = ", ".join(sorted(backends)) or "none"
        raise ModelNotFound(f"the model {model!r} does not exist in this fleet (models: {known})", param="model")
    state = backend.lifecycle.state
    if not state.serving:
        why = f": {backend.lifecycle.reason}" if backend.lifecycle.reason and state is EngineState.FAILED else ""
        raise ModelNotReady(
            f"model {model!r} is not ready (engine {state.value}{why}); retry later",
            retry_after=RETRY_AFTER.get(state, 5),
        )
    return backend
