"""Field types every table of fleet.toml shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


def _not_bool(value: Any) -> Any:
    """pydantic's lax mode reads `true` as 1; in a fleet file that is a typo, not a number."""
    if isinstance(value, bool):
        raise ValueError("must be an integer, not true/false")
    return value


# Lax (FLEET_ environment values arrive as strings) but never a TOML boolean.
Int = Annotated[int, BeforeValidator(_not_bool)]


def user_path(path: str) -> Path:
    """A path as a user writes it, `~` and `~user` expanded. A `~user` this machine has no home
    directory for is a ValueError naming it (pathlib raises a bare RuntimeError)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ValueError(f"{path}: {path.split('/', 1)[0]} names no home directory on this machine") from None


def _expandable(path: str) -> str:
    user_path(path)
    return path


# A file or folder the user names: kept as written, its `~` checked here so that nothing fails later.
UserPath = Annotated[str, AfterValidator(_expandable)]


class Strict(BaseModel):
    """A table: unknown keys are errors (typos), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
