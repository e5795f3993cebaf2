"""The checks that need the machine, done before anything starts: where each model will run
(`check_machine`, whose `CheckReport` `fleet check` prints and `fleet launch` refuses to start on
an error of), whether two engines can run at once (a rolling reload's), the GPUs' shares.

The file-only rules (names, ports, GPU sharing) are fleet/config/load.py's; these need the
machine: the GPUs it has, the ports other processes hold, the model sources on disk (probe.py).
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from fleet.config.load import replica_field
from fleet.config.model import ModelConfig
from fleet.config.schema import ENGINE_TOKEN_ENV, FleetConfig, shared_engine_token
from fleet.machine.probe import attention_heads, in_hf_cache, port_in_use, visible_gpus, vllm_parsers
from fleet.sources import DEFAULT_NAME, SourceKind, cache_dir, classify, default_gguf


class SourceState(StrEnum):
    FOUND = "found"
    WILL_CONVERT = "will convert"
    WILL_DOWNLOAD = "will download"
    MISSING = "missing"


@dataclass
class CheckReport:
    """The outcome of the checks: per-model source states, per-GPU use, errors and warnings."""

    sources: dict[str, SourceState] = field(default_factory=dict)
    gpus: dict[int, list[tuple[str, float]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cluster: list[tuple[str, list[str]]] = field(default_factory=list)  # on a cluster: replica -> node ids it fits on
    nodes: dict[str, str] = field(default_factory=dict)  # the cluster's node ids -> addresses


def source_state(m: ModelConfig) -> tuple[SourceState, str | None]:
    """Whether a model's source is on disk, will be converted or downloaded, or is missing."""
    src = classify(m.source)
    if src.kind is SourceKind.DEFAULT:
        if (cache_dir() / "models" / DEFAULT_NAME / "config.json").is_file():
            return SourceState.FOUND, None
        try:
            path = default_gguf()
        except FileNotFoundError as e:
            return SourceState.MISSING, str(e)
        return (SourceState.WILL_CONVERT, None) if path.is_file() else (SourceState.MISSING, f"{path} not found")
    if src.kind is SourceKind.GGUF:
        path = Path(src.location)
        ok = path.is_file() and os.access(path, os.R_OK)
        return (SourceState.WILL_CONVERT, None) if ok else (SourceState.MISSING, f"cannot read GGUF file {path}")
    if src.kind is SourceKind.DIRECTORY:
        path = Path(src.location)
        if not path.is_dir() or not os.access(path, os.R_OK):
            return SourceState.MISSING, f"cannot read model directory {path}"
        if not (path / "config.json").is_file():
            return SourceState.MISSING, f"{path} has no config.json"
        return SourceState.FOUND, None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if in_hf_cache(m.source):
        return SourceState.FOUND, None
    if offline:
        return SourceState.MISSING, f"{m.source} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    return SourceState.WILL_DOWNLOAD, None


def check_machine(config: FleetConfig, path: Path | str, *, gpus: list[int] | None = None,
                  probe_ports: bool = True, env: Mapping[str, str] | None = None) -> CheckReport:
    """Every machine-dependent rule; `gpus` overrides what nvidia-smi reports (tests)."""
    out = CheckReport()
    have = gpus if gpus is not None else visible_gpus()
    for i, m in enumerate(config.models):
        where = f'{path}: model "{m.name}" (models[{i}])'
        state, why = source_state(m)
        out.sources[m.name] = state
        if state is SourceState.MISSING:
            out.errors.append(f'{where}, field "source": {why}')
        heads = attention_heads(m)
        started = [r for r in m.replica_configs() if not r.attached]  # an attached engine's machine is its own
        local = [] if config.cluster else started  # a cluster's run on its nodes (the cluster's check: cli)
        for tp in sorted({r.tensor_parallel_size for r in started}):
            if heads is not None and heads % tp:
                out.errors.append(
                    f'{where}, field "gpus": tensor parallel size {tp} (one per GPU of a replica) must divide '
                    f"the model's {heads} attention heads"
                )
        for r in local:
            for g in r.gpus:
                out.gpus.setdefault(g, []).append((r.replica_name, r.memory_fraction))
                if have is not None and g not in have:
                    found = ", ".join(map(str, have)) or "none"
                    out.errors.append(f'{where}, field "{replica_field(m, r.replica, "gpus")}": this machine has no '
                                      f"GPU {g} (GPUs: {found})")
            if probe_ports and port_in_use(r.host, r.port):
                out.errors.append(f'{where}, field "{replica_field(m, r.replica, "port")}": {r.host}:{r.port} is already '
                                  "in use by another process")
        if len(started) < m.replicas:
            try:
                token = shared_engine_token(config.gateway, os.environ if env is None else env)
            except ValueError as e:
                out.errors.append(f"{path}: {e}")
                token = ""
            if token is None:
                out.errors.append(f"{where}: an attached engine (url) needs the fleet's shared engine token: set "
                                  f"{ENGINE_TOKEN_ENV} or [gateway] engine_token_file, the same for `fleet engine`")
        for field_name, kind in (("tool_parser", "tool"), ("reasoning_parser", "reasoning")):
            name = getattr(m, field_name)
            known = vllm_parsers(kind) if name else None
            if name and known is None:
                out.warnings.append(f'{where}, field "{field_name}": vLLM is not installed here: cannot tell whether it '
                                    f"has the {kind} parser {name!r}")
            elif name and known is not None and name not in known:
                out.errors.append(f'{where}, field "{field_name}": vLLM has no {kind} parser {name!r} (it has: '
                                  f"{', '.join(sorted(known))})")
        if any(r.gpus for r in local) and have is None:
            out.warnings.append(f'{where}: cannot tell which GPUs this machine has (no nvidia-smi)')
    gw = config.gateway
    if probe_ports and port_in_use(gw.host, gw.port):
        out.errors.append(f'{path}: [gateway], field "port": {gw.host}:{gw.port} is already in use by another process')
    return out


def can_run_together(old: ModelConfig, new: ModelConfig) -> bool:
    """Whether two engines of this machine can run at once (a rolling reload's predecessor and
    successor): not on the same port, not on a GPU in common, not both on the CPU (a successor gets
    its predecessor's cores: two engines on one core set crawl, and moving onto cores where vLLM's
    threads spin can stall a process for minutes); attached engines unless at the same url."""
    if old.attached or new.attached:
        return old.url != new.url
    return old.port != new.port and not set(old.gpus) & set(new.gpus) and not (old.on_cpu and new.on_cpu)


def gpu_rows(report: CheckReport) -> list[tuple[int, list[str], float]]:
    """Per GPU: the models on it and their summed memory fraction."""
    by_gpu: dict[int, list[tuple[str, float]]] = defaultdict(list, report.gpus)
    return [(g, [n for n, _ in by_gpu[g]], round(sum(f for _, f in by_gpu[g]), 3)) for g in sorted(by_gpu)]


