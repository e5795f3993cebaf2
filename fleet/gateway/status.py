"""fleet's own answers, as msgspec Structs: `/health`, and `/fleet/status` as the launcher builds
it, the control route sends it and `fleet status` reads it back (the engine states they report:
fleet/lifecycle.py).

No Litestar here: the `fleet` command imports this module to read the status.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from fleet.lifecycle import EngineState


class Health(msgspec.Struct):
    status: Literal["ok"]
    models: dict[str, str]  # model name -> engine state


class GatewayStatus(msgspec.Struct):
    host: str
    port: int
    pid: int
    started: int  # Unix time


class ModelStatus(msgspec.Struct):
    """One engine's row of `fleet status`: a model's, or one replica's of a model that has several."""

    model: str
    replica: str  # the engine's name: the model's, or "<model>.<k>" for replica k
    state: EngineState
    reason: str
    gpus: list[int]
    port: int
    pid: int | None
    uptime_s: float | None  # while ready
    restarts: int
    inflight: int
    requests: int  # engine requests sent to this replica (one per prompt)
    tokens_per_s: float
    routed: dict[str, int] = {}  # why requests came here: least_loaded, affinity, spilled, failed_over
    url: str | None = None  # an attached engine's (fleet did not start it: no pid)
    node: str | None = None  # on a cluster: the node it runs on (its pid is that node's)
    since_s: float = 0.0  # in its state for this long
    queued: int = 0  # the model's requests waiting for a slot (all its replicas share the queue)
    errors: int = 0  # engine requests that failed on this replica
    draining: bool = False  # takes no new requests (the status page's drain); those in flight go on
    attached: bool = False  # started elsewhere and only watched: fleet cannot restart it
    host: str = ""  # the address the engine listens on (on a cluster, its node's)
    on_demand: bool = False  # started on demand (or its set's member): `fleet sleep` / `fleet wake` apply
    swap_set: str | None = None  # its [[sets]] entry
    adapters: dict[str, int] = {}  # the model's LoRA adapters: requests naming each (the model's, on every replica's row)
    taken_over: dict[str, int] = {}  # the model's requests whose engine died under them: rerun, resumed, given_up


class FleetStatus(msgspec.Struct):
    gateway: GatewayStatus
    models: list[ModelStatus]


class LogLine(msgspec.Struct, array_like=True):
    """One line an engine wrote (or the launcher wrote about it), numbered fleet-wide."""

    seq: int
    engine: str  # the replica's name
    at: float  # Unix time
    text: str


class Change(msgspec.Struct):
    """One engine's state change, numbered fleet-wide (with the log lines)."""

    seq: int
    engine: str
    at: float
    old: EngineState
    new: EngineState
    reason: str


class ReloadReport(msgspec.Struct):
    """What a reload changed."""

    added: list[str] = []
    removed: list[str] = []
    changed: list[str] = []
    unchanged: list[str] = []
    adapters: list[str] = []  # models whose LoRA adapters changed alone: applied without a restart
    warnings: list[str] = []


class LoadAdapter(msgspec.Struct, forbid_unknown_fields=True):
    """POST /v1/load_lora_adapter, in vLLM's shape; `model`: the base (needed where several models serve LoRA)."""

    lora_name: str
    lora_path: str
    model: str | None = None


class UnloadAdapter(msgspec.Struct, forbid_unknown_fields=True):
    """POST /v1/unload_lora_adapter, in vLLM's shape."""

    lora_name: str
    model: str | None = None
