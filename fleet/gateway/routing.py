"""Which engine takes a request: a pure decision over the fleet's backends, testable without processes."""

from __future__ import annotations

from collections.abc import Mapping

from fleet.errors import ModelNotFound, ModelNotReady, shown
from fleet.gateway.backend import Backend
from fleet.gateway.status import EngineState

RETRY_AFTER = {EngineState.STARTING: 10, EngineState.RESTARTING: 10, EngineState.FAILED: 30}


def find(backends: Mapping[str, Backend], model: str) -> Backend:
    """The backend of `model`, whatever its state; 404 if the fleet has no such model."""
    backend = backends.get(model)
    if backend is None:
        known = ", ".join(sorted(backends)) or "none"
        raise ModelNotFound(f"the model {shown(model)} does not exist in this fleet (models: {known})")
    return backend


def route(backends: Mapping[str, Backend], model: str) -> Backend:
    """The backend serving `model`; 404 if the fleet has no such model, 503 if it is not ready."""
    backend = find(backends, model)
    state = backend.lifecycle.state
    if not state.serving:
        why = f": {backend.lifecycle.reason}" if backend.lifecycle.reason and state is EngineState.FAILED else ""
        raise ModelNotReady(
            f"model {model!r} is not ready (engine {state.value}{why}); retry later",
            retry_after=RETRY_AFTER.get(state, 5),
        )
    return backend
