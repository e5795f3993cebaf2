"""A model's LoRA adapters in fleet.toml (`adapters`, `max_loras`, `max_lora_rank`): checked before
anything starts, each error naming the model, the adapter and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fleet.config.load import parse_config
from fleet.errors import ConfigError


def adapter(folder: Path, base: str, rank: int = 8, peft_type: str = "LORA") -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": rank,
                                                            "base_model_name_or_path": base}))
    return str(folder)


def refused(*models: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config({"models": list(models)}, "f.toml")
    return str(e.value)


def test_adapters_turn_on_vllms_lora_with_the_models_limits(tmp_path: Path) -> None:
    a1 = adapter(tmp_path / "a1", "org/Base-7B")
    config = parse_config({"models": [{"name": "base", "source": "/models/Base-7B", "port": 9001,
                                       "adapters": {"a1": a1}, "max_loras": 2, "max_lora_rank": 32}]})
    engine = json.loads(config.models[0].engine_json())
    assert engine["adapters"] == {"a1": a1}
    assert {k: engine["engine_args"][k] for k in ("enable_lora", "max_loras", "max_lora_rank")} == \
        {"enable_lora": True, "max_loras": 2, "max_lora_rank": 32}


@pytest.mark.parametrize("make,message", [
    (lambda p: str(p / "missing"), "no adapter directory at"),
    (lambda p: adapter(p / "a", "org/Other-7B"), "is an adapter of 'org/Other-7B', not of this model's source"),
    (lambda p: adapter(p / "a", "org/Base-7B", rank=64), "has rank 64, above max_lora_rank = 16"),
    (lambda p: adapter(p / "a", "org/Base-7B", peft_type="PREFIX_TUNING"), "is not a LoRA adapter"),
])
def test_an_adapter_that_is_not_one_of_this_base_is_refused_naming_model_and_adapter(
    tmp_path: Path, make: Any, message: str,
) -> None:
    error = refused({"name": "base", "source": "org/Base-7B", "port": 9001, "adapters": {"mine": make(tmp_path)}})
    assert 'model "base" (models[0]), field "adapters.mine": ' in error and message in error


def test_an_adapter_named_like_a_model_or_another_models_adapter_is_refused(tmp_path: Path) -> None:
    a = adapter(tmp_path / "a", "org/Base-7B")
    error = refused({"name": "base", "source": "org/Base-7B", "port": 9001, "adapters": {"other": a, "shared": a}},
                    {"name": "other", "source": "org/Base-7B", "port": 9002, "adapters": {"shared": a}})
    assert 'field "adapters.other": \'other\' is also a model\'s name' in error
    assert 'model "other" (models[1]), field "adapters.shared": \'shared\' is also an adapter of model \'base\'' in error


def test_an_embedding_model_has_no_adapters(tmp_path: Path) -> None:
    error = refused({"name": "emb", "source": "org/Base-7B", "port": 9001, "task": "embed",
                     "adapters": {"a": adapter(tmp_path / "a", "org/Base-7B")}})
    assert "an embedding model serves no LoRA adapters" in error


def test_an_adapter_trained_on_a_path_under_a_user_this_machine_lacks_is_told_apart_by_its_name(tmp_path: Path) -> None:
    """An adapter made on another machine may name its base `~someone/Base-7B`: compared by name, never a crash."""
    from fleet.config.adapters import check_adapter

    assert check_adapter("a", adapter(tmp_path / "a", "~fleet-no-such-user/Base-7B"), "m", "org/Base-7B", 16) == []
    problems = check_adapter("b", adapter(tmp_path / "b", "~fleet-no-such-user/Other"), "m", "org/Base-7B", 16)
    assert [field for field, _ in problems] == ["adapters.b"] and "not of this model's source" in problems[0][1]
