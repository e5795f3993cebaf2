"""A model looked up by the name a request gives: 404 when the fleet has no such model (whether
it serves is the model's to say: ServedModel.serving)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from fleet.errors import ModelNotFound, shown
from fleet.lifecycle import EngineState


class Named(Protocol):
    """What a lookup reads of a model (fleet.gateway.model.ServedModel)."""

    @property
    def state(self) -> EngineState: ...

    @property
    def reason(self) -> str: ...


M = TypeVar("M", bound=Named)


def find(models: Mapping[str, M], name: str) -> M:
    """The model called `name`, whatever its state; 404 if the fleet has no such model."""
    model = models.get(name)
    if model is None:
        known = ", ".join(sorted(models)) or "none"
        raise ModelNotFound(f"the model {shown(name)} does not exist in this fleet (models: {known})")
    return model
