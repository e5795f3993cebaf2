"""A model's LoRA adapters in fleet.toml: whether a directory holds a PEFT LoRA of the model's base
(checked for the file's adapters and for those loaded at run time alike)."""

from __future__ import annotations

import json
from pathlib import Path

from fleet.config.fields import user_path


def check_adapter(name: str, path: str, model: str, source: str, max_rank: int) -> list[tuple[str, str]]:
    """(field, problem) for one adapter of model `model` (from `source`): a directory holding a PEFT adapter_config.json
    (a LoRA), trained on this base (its base_model_name_or_path is the model's source, or names
    the same folder or Hugging Face model by its last part), its rank within max_lora_rank."""
    field = f"adapters.{name}"
    if not name or name == model:
        return [(field, "an adapter's name is its own (not empty, not the model's)")]
    if not path:
        return [(field, "an adapter's path is its directory (not empty)")]
    try:
        folder = user_path(path)
    except ValueError as e:
        return [(field, str(e))]
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        return [(field, f"no adapter directory at {path}")]
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        return [(field, f"{path} is not a PEFT adapter (its adapter_config.json: {e})")]
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        return [(field, f"{path} is not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else '?'!r})")]
    problems = []
    trained_on = str(config.get("base_model_name_or_path") or "")
    if trained_on and not same_model(trained_on, source):
        problems.append((field, f"{path} is an adapter of {trained_on!r}, not of this model's source {source!r}"))
    rank = config.get("r")
    if isinstance(rank, int) and rank > max_rank:
        problems.append((field, f"{path} has rank {rank}, above max_lora_rank = {max_rank}"))
    return problems


def same_model(a: str, b: str) -> bool:
    """Whether two model references name the same model: equal, the same folder, or the same last part
    (a local copy of a Hugging Face model keeps its name: "org/Model" and "/models/Model")."""
    if a == b:
        return True
    pa, pb = _as_written(a), _as_written(b)
    if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
        return True
    return pa.name.lower() == pb.name.lower() != ""


def _as_written(reference: str) -> Path:
    """A model reference as a path, `~` expanded where this machine can (an adapter's
    base_model_name_or_path may come from another machine)."""
    try:
        return user_path(reference)
    except ValueError:
        return Path(reference)
