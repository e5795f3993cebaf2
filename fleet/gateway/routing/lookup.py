"""A model looked up by the name a request gives (a model's, or one of its LoRA adapters'): 404 when
the fleet has no such model (whether it serves is the model's to say: ServedModel.serving)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Protocol, TypeVar

from fleet.errors import ModelNotFound, shown
from fleet.lifecycle import EngineState


class Named(Protocol):
    """What a lookup reads of a model (fleet.gateway.model.ServedModel)."""

    @property
    def state(self) -> EngineState: ...

    @property
    def reason(self) -> str: ...

    @property
    def adapters(self) -> Collection[str]: ...


M = TypeVar("M", bound=Named)


def find(models: Mapping[str, M], name: str) -> M:
    """The model called `name`, whatever its state; 404 if the fleet has no such model."""
    model = models.get(name)
    if model is None:
        raise _not_found(models, name)
    return model


def resolve(models: Mapping[str, M], name: str) -> tuple[M, str | None]:
    """The model called `name` (and None), or the model one of whose adapters it names (and the
    adapter); 404 if neither."""
    model = models.get(name)
    if model is not None:
        return model, None
    for model in models.values():
        if name in model.adapters:
            return model, name
    raise _not_found(models, name)


def _not_found(models: Mapping[str, M], name: str) -> ModelNotFound:
    known = ", ".join(sorted(models)) or "none"
    adapters = sorted(a for m in models.values() for a in m.adapters)
    also = f"; adapters: {', '.join(adapters)}" if adapters else ""
    return ModelNotFound(f"the model {shown(name)} does not exist in this fleet (models: {known}{also})")
