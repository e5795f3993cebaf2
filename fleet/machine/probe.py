"""What this machine has, read before anything starts: its GPUs (nvidia-smi), the ports other
processes hold, its processor's features (and so the dtype a CPU engine runs in), the Hugging Face
cache and a local model's own config; and the cores each CPU engine gets.

May import: fleet.config, fleet.sources, fleet.errors.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Collection, Mapping, Sequence
from functools import cache
from pathlib import Path

from fleet.config.model import ModelConfig
from fleet.sources import DEFAULT_NAME, SourceKind, cache_dir, classify


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


def in_hf_cache(repo_id: str) -> bool:
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


# Where vLLM keeps its parser registries: the package folder and the names of its registry dicts
PARSER_FOLDERS = {"tool": ("tool_parsers", "entrypoints/openai/tool_parsers"), "reasoning": ("reasoning",)}


@cache
def vllm_parsers(kind: str) -> frozenset[str] | None:
    """The names of the `kind` ("tool" or "reasoning") parsers the installed vLLM registers, read
    from its source without importing it (an import costs seconds, and the launcher that serves the
    gateway must never import vLLM): the keys of its registry dicts, and the names its
    `register_module` / `register_lazy_module` calls give. None where vLLM is not installed here."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    names: set[str] = set()
    for folder in (root / sub for sub in PARSER_FOLDERS[kind]):
        for path in folder.glob("*.py") if folder.is_dir() else ():
            try:
                tree = ast.parse(path.read_text())
            except (OSError, SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                        isinstance(t, ast.Name) and t.id.endswith("_TO_REGISTER") for t in node.targets):
                    names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
                elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("register_module", "register_lazy_module"):
                    given = [*node.args[:1], *(k.value for k in node.keywords if k.arg in ("name", "name_or_names", "names"))]
                    for arg in given:
                        values = arg.elts if isinstance(arg, (ast.List, ast.Tuple)) else [arg]
                        names.update(v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str))
    return frozenset(names)
