"""Where each model will run, and the checks that need the machine, done before anything starts.

`fleet check` prints the placement; `fleet launch` runs the same checks and refuses to start
on an error. The file-only rules (names, ports, GPU sharing) live in config.py; these need the
machine: the GPUs it has, the ports other processes hold, the model sources on disk, and the
processor's features (which dtype a CPU engine runs in).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from fleet.config.load import replica_field
from fleet.config.model import ModelConfig
from fleet.config.schema import ENGINE_TOKEN_ENV, FleetConfig, shared_engine_token
from fleet.config.sources import DEFAULT_NAME, SourceKind, cache_dir, classify, default_gguf


class SourceState(StrEnum):
    FOUND = "found"
    WILL_CONVERT = "will convert"
    WILL_DOWNLOAD = "will download"
    MISSING = "missing"


@dataclass
class Placement:
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
    if _in_hf_cache(m.source):
        return SourceState.FOUND, None
    if offline:
        return SourceState.MISSING, f"{m.source} is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    return SourceState.WILL_DOWNLOAD, None


def _in_hf_cache(repo_id: str) -> bool:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    return (hub / f"models--{repo_id.replace('/', '--')}").is_dir()


def attention_heads(m: ModelConfig) -> int | None:
    """The model's attention heads, from its config.json when the source is local."""
    src = classify(m.source)
    folder = {
        SourceKind.DIRECTORY: Path(src.location),
        SourceKind.DEFAULT: cache_dir() / "models" / DEFAULT_NAME,
    }.get(src.kind)
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = cfg.get("num_attention_heads") or cfg.get("text_config", {}).get("num_attention_heads")
    return heads if isinstance(heads, int) else None


def visible_gpus() -> list[int] | None:
    """The machine's NVIDIA GPU indexes, or None when nothing can tell (no nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [int(x) for x in out.split() if x.strip().isdigit()]


def port_in_use(host: str, port: int) -> bool:
    """True when another process already listens on (host, port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_placement(config: FleetConfig, path: Path | str, *, gpus: list[int] | None = None,
                    probe_ports: bool = True, env: Mapping[str, str] | None = None) -> Placement:
    """Every machine-dependent rule; `gpus` overrides what nvidia-smi reports (tests)."""
    out = Placement()
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


def gpu_rows(placement: Placement) -> list[tuple[int, list[str], float]]:
    """Per GPU: the models on it and their summed memory fraction."""
    by_gpu: dict[int, list[tuple[str, float]]] = defaultdict(list, placement.gpus)
    return [(g, [n for n, _ in by_gpu[g]], round(sum(f for _, f in by_gpu[g]), 3)) for g in sorted(by_gpu)]


def cpu_bindings(models: Sequence[ModelConfig], cores: Sequence[int], env: Mapping[str, str]) -> dict[str, str]:
    """Disjoint core sets for several CPU engines (vLLM would pin every one to the same cores),
    unless `env` binds them already."""
    cpu = [r for m in models for r in m.replica_configs() if r.on_cpu and not r.attached]  # one core set per engine
    if len(cpu) < 2 or "VLLM_CPU_OMP_THREADS_BIND" in env:
        return {}
    cores = sorted(cores)
    share = max(1, len(cores) // len(cpu))
    bindings = {}
    for i, m in enumerate(cpu):
        mine = cores[i * share:(i + 1) * share] if len(cores) >= len(cpu) else [cores[i % len(cores)]]
        bindings[m.replica_name] = ",".join(map(str, mine))
    return bindings


# CPU features with which a processor multiplies bfloat16 natively (oneDNN uses them; without them
# vLLM's CPU build falls back to torch's own linear, ~3x slower than float32 at batch 16)
BF16_NATIVE = ("amx_bf16", "avx512_bf16")


@cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of this machine's processor (empty where /proc/cpuinfo is not readable)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_dtype(requested: str, flags: Collection[str]) -> tuple[str, str]:
    """The dtype a CPU engine runs in, and why: `dtype = "auto"` takes bfloat16 where the processor
    multiplies it natively and float32 elsewhere; any other value is the file's choice."""
    if requested != "auto":
        return requested, "set in the fleet file"
    if native := [f for f in BF16_NATIVE if f in flags]:
        return "bfloat16", f"auto: this CPU multiplies bfloat16 natively ({', '.join(native)})"
    return "float32", "auto: this CPU has no native bfloat16 (no amx_bf16 or avx512_bf16), where float32 is faster"


def engine_dtype(m: ModelConfig, flags: Collection[str] | None = None) -> tuple[str, str]:
    """The dtype vLLM is given for a model, and why (on GPUs the file's value, "auto" included,
    which vLLM resolves from the model's own config)."""
    if not m.on_cpu:
        return m.dtype, "vLLM's auto: the model's own dtype" if m.dtype == "auto" else "set in the fleet file"
    return cpu_dtype(m.dtype, cpu_flags() if flags is None else flags)
