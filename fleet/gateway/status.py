"""fleet's own answers, as msgspec Structs: `/health`, and `/fleet/status` as the launcher builds
it, the control route sends it and `fleet status` reads it back; and the engine states they report.

No Litestar here: the `fleet` command imports this module to read the status.
"""

from __future__ import annotations

import enum
from typing import Literal

import msgspec


class EngineState(enum.StrEnum):
    """Where an engine is in its lifecycle (the transitions: fleet/run/lifecycle.py)."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    RESTARTING = "restarting"
    STOPPING = "stopping"

    @property
    def serving(self) -> bool:
        """Whether requests may be sent to an engine in this state."""
        return self is EngineState.READY


class Health(msgspec.Struct):
    status: Literal["ok"]
    models: dict[str, str]  # model name -> engine state


class GatewayStatus(msgspec.Struct):
    host: str
    port: int
    pid: int
    started: int  # Unix time


class ModelStatus(msgspec.Struct):
    """One model's row of `fleet status`."""

    model: str
    state: EngineState
    reason: str
    gpus: list[int]
    port: int
    pid: int | None
    uptime_s: float | None  # while ready
    restarts: int
    inflight: int
    requests: int
    tokens_per_s: float


class FleetStatus(msgspec.Struct):
    gateway: GatewayStatus
    models: list[ModelStatus]


class ReloadReport(msgspec.Struct):
    """What a reload changed."""

    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    warnings: list[str] = []
