"""[[sets]] and the sleep fields in fleet.toml: every rule checked before anything starts, each
error naming the set or the model and the field."""

from __future__ import annotations

from typing import Any

import pytest

from fleet.config.load import parse_config
from fleet.errors import ConfigError


def model(name: str, port: int, **fields: Any) -> dict[str, Any]:
    return {"name": name, "source": "x", "port": port, **fields}


def fleet(*models: dict[str, Any], sets: list[dict[str, Any]] | None = None, **tables: Any) -> Any:
    return parse_config({"models": list(models), **({"sets": sets} if sets is not None else {}), **tables}, "f.toml")


def refused(*models: dict[str, Any], sets: list[dict[str, Any]] | None = None, **tables: Any) -> str:
    with pytest.raises(ConfigError) as e:
        fleet(*models, sets=sets, **tables)
    return str(e.value)


GPU0 = {"gpus": [0]}


def test_members_of_a_set_share_a_gpu_without_memory_fractions_when_one_is_awake_at_once() -> None:
    config = fleet(model("a", 9001, **GPU0), model("b", 9002, **GPU0), model("c", 9003, **GPU0),
                   sets=[{"name": "desk", "models": ["a", "b", "c"]}])
    assert [m.swap_set for m in config.models] == ["desk"] * 3
    assert all(m.on_demand and m.may_sleep for m in config.models)
    assert '"enable_sleep_mode":true' in config.models[0].engine_json()


def test_without_a_set_the_same_models_on_one_gpu_are_refused() -> None:
    error = refused(model("a", 9001, **GPU0), model("b", 9002, **GPU0))
    assert 'model "a" (models[0]), field "gpu_memory_utilization": GPU 0 is shared' in error


def test_a_set_that_keeps_two_awake_needs_fractions_that_fit_together() -> None:
    error = refused(model("a", 9001, gpu_memory_utilization=0.6, **GPU0),
                    model("b", 9002, gpu_memory_utilization=0.6, **GPU0),
                    model("c", 9003, gpu_memory_utilization=0.2, **GPU0),
                    sets=[{"name": "desk", "models": ["a", "b", "c"], "awake": 2}])
    assert "ask for 1.20 of its memory together (of a set: what is awake at once)" in error


def test_a_set_beside_another_model_on_its_gpu_counts_its_largest_member() -> None:
    fleet(model("a", 9001, gpu_memory_utilization=0.5, **GPU0), model("b", 9002, gpu_memory_utilization=0.4, **GPU0),
          model("other", 9003, gpu_memory_utilization=0.4, **GPU0), sets=[{"name": "desk", "models": ["a", "b"]}])
    error = refused(model("a", 9001, gpu_memory_utilization=0.6, **GPU0),
                    model("b", 9002, gpu_memory_utilization=0.4, **GPU0),
                    model("other", 9003, gpu_memory_utilization=0.4, **GPU0), sets=[{"name": "desk", "models": ["a", "b"]}])
    assert 'model "a" (models[0]), field "gpu_memory_utilization"' in error and "it can never be awake" in error


@pytest.mark.parametrize("sets,message", [
    ([{"name": "desk", "models": ["a", "nope"]}], 'set "desk" (sets[0]), field "models": no model is called "nope"'),
    ([{"name": "desk", "models": ["a", "b"]}, {"name": "desk", "models": ["c", "d"]}],
     'set "desk" (sets[1]), field "name": duplicate name, also sets[0]'),
    ([{"name": "x", "models": ["a", "b"]}, {"name": "y", "models": ["b", "c"]}],
     'set "y" (sets[1]), field "models": "b" is already a member of set "x"'),
    ([{"name": "desk", "models": ["a", "b"], "awake": 2}], 'set "desk" (sets[0]), field "awake": 2 awake of 2 models'),
    ([{"name": "desk", "models": ["a"]}], 'field "sets[0].models": List should have at least 2 items'),
    ([{"name": "desk", "models": ["a", "b"], "min_awake": -1}], 'field "sets[0].min_awake"'),
])
def test_set_rules(sets: list[dict[str, Any]], message: str) -> None:
    models = [model(n, 9001 + k) for k, n in enumerate("abcd")]
    assert message in refused(*models, sets=sets)


def test_a_member_at_a_url_is_refused() -> None:
    error = refused(model("a", 9001), {"name": "b", "source": "x", "url": "http://10.0.0.2:9000"},
                    sets=[{"name": "desk", "models": ["a", "b"]}])
    assert 'set "desk" (sets[0]), field "models": model "b" (models[1]) is an engine at a url' in error


def test_a_set_on_a_cluster_is_refused() -> None:
    error = refused(model("a", 9001), model("b", 9002), sets=[{"name": "desk", "models": ["a", "b"]}],
                    cluster={"address": "auto"})
    assert 'field "models": on a [cluster] every engine runs from launch' in error


def test_a_sleep_level_on_the_cpu_is_refused_as_the_cpu_build_has_no_sleep_mode() -> None:
    error = refused(model("a", 9001, when_idle="sleep", idle_after=60, sleep_level=1))
    assert 'model "a" (models[0]), field "sleep_level": the CPU build of vLLM has no sleep mode' in error


def test_on_the_cpu_a_model_that_sleeps_when_idle_is_stopped_instead() -> None:
    m = fleet(model("a", 9001, when_idle="sleep", idle_after=60)).models[0]
    assert not m.may_sleep and m.rest_level(idle=True) == 0 and "enable_sleep_mode" not in m.engine_json()


def test_a_sleep_level_for_a_model_that_never_sleeps_is_refused() -> None:
    error = refused(model("a", 9001, sleep_level=2, **GPU0))
    assert 'model "a" (models[0]), field "sleep_level": it never sleeps' in error


def test_on_gpus_the_sleep_level_applies_when_idle_and_when_made_room_for_but_stop_means_stop() -> None:
    config = fleet(model("a", 9001, when_idle="stop", idle_after=5, sleep_level=2, **GPU0), model("b", 9002, **GPU0),
                   sets=[{"name": "desk", "models": ["a", "b"]}])
    a, b = config.models
    assert (a.rest_level(idle=True), a.rest_level(idle=False), b.rest_level(idle=False)) == (0, 2, 1)


def test_a_member_that_alone_asks_for_more_than_its_gpu_holds_can_never_be_awake() -> None:
    error = refused(model("a", 9001, gpu_memory_utilization=1.0, **GPU0), model("b", 9002, gpu_memory_utilization=0.5, **GPU0),
                    sets=[{"name": "desk", "models": ["a", "b"]}])
    assert ('model "a" (models[0]), field "gpu_memory_utilization": with the models outside set "desk" on GPU 0 it '
            "asks for 1.00 of its memory: it can never be awake (at most 0.95)") in error


def test_a_model_whose_name_is_not_a_string_is_named_by_its_place_in_a_file_with_sets() -> None:
    error = refused(model("a", 9001), {**model("b", 9002), "name": ["b"]}, sets=[{"name": "desk", "models": ["a", "b"]}])
    assert 'models[1], field "name": Input should be a valid string' in error
    assert "['b']" not in error
