"""Field types every table of fleet.toml shares."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _not_bool(value: Any) -> Any:
    """pydantic's lax mode reads `true` as 1; in a fleet file that is a typo, not a number."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true/false")
    return value


# Lax (FLEET_ environment values arrive as strings) but never a TOML boolean.
Int = Annotated[int, BeforeValidator(_not_bool)]


class Strict(BaseModel):
    """A table: unknown keys are errors (typos), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
