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


def _distinct_gpu_ids(gpus: list[int]) -> list[int]:
    if any(g < 0 for g in gpus):
        raise ValueError("GPU ids are >= 0")
    if len(set(gpus)) != len(gpus):
        raise ValueError("a GPU id is listed twice")
    return gpus


# CUDA device ids, each once (a model's, or one placement's)
GpuIds = Annotated[list[Int], AfterValidator(_distinct_gpu_ids)]


NAME_MAX = 255  # bytes in one part of a path (Linux, macOS): a longer one is an OSError wherever it is looked at
PATH_MAX = 4096


def check_path_length(path: str) -> str:
    """A path this machine could hold: each part at most NAME_MAX bytes, the whole at most PATH_MAX
    (pathlib's is_dir and is_file raise on a longer one, where they answer False for a missing file)."""
    if len(path.encode(errors="surrogateescape")) > PATH_MAX:
        raise ValueError(f"a path is at most {PATH_MAX} bytes, this one is {len(path.encode(errors='surrogateescape')):,}")
    if any(len(part.encode(errors="surrogateescape")) > NAME_MAX for part in path.split("/")):
        raise ValueError(f"{path[:60]}...: each part of a path (between two /) is at most {NAME_MAX} bytes")
    return path


def user_path(path: str) -> Path:
    """A path as a user writes it, `~` and `~user` expanded. A `~user` this machine has no home
    directory for, or a path longer than a file system holds, is a ValueError naming it (pathlib
    raises a bare RuntimeError for the one, an OSError wherever the path is looked at for the other)."""
    check_path_length(path)
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise ValueError(f"{path}: {path.split('/', 1)[0]} names no home directory on this machine") from None


def _expandable(path: str) -> str:
    user_path(path)
    return path


# A file or folder the user names: kept as written, its `~` and length checked here so that nothing fails later.
UserPath = Annotated[str, AfterValidator(_expandable)]


class Strict(BaseModel):
    """A table: unknown keys are errors (typos), values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
