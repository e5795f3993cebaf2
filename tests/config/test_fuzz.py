"""A fleet file under random damage: every mutation of a valid file is either a fleet that the
checks and the engine's arguments take without a traceback, or a ConfigError whose message names
the file (and, where it is a model's field, the model and the field) — never another exception.

Hypothesis starts from a file that uses most of what fleet.toml can say (gateway, auth, supervisor,
ui, responses, a set of models taking turns, CPU and GPU models, replicas and placements, an
embedding model, adapters, an engine at a url) and changes it one to three places at a time:
removes a key or an array's element, puts any TOML value where one was (a string for a number, a
table for a list, a date, a huge integer, inf, an empty string, ...), or adds a field, a known name
in the wrong place or an unknown one.

Knobs (as tests/gateway/test_fuzz.py): ``FLEET_FUZZ_EXAMPLES`` (default 400 here) and
``FLEET_FUZZ_RANDOM=1`` (a fresh random seed instead of the fixed, CI-stable one).
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rich.console import Console

from fleet.config.load import load_config
from fleet.config.schema import FleetConfig
from fleet.config.show import effective_toml
from fleet.engine.args import engine_arguments
from fleet.errors import ConfigError
from fleet.machine.check import check_machine
from fleet.run.launcher import Fleet

# each line after the file's: what it is about (a model by name and place, a set, a field), then why
PROBLEM = re.compile(r'^  (model ".*" \(models\[\d+\]\)|models\[\d+\]|set ".*" \(sets\[\d+\]\)|field ".+"|\(top level\))'
                     r'(, field ".+")?: \S')
EXAMPLES = int(os.environ.get("FLEET_FUZZ_EXAMPLES", "400"))  # ~3 s: a file loads in ~1 ms

BASE: dict[str, Any] = {
    "gateway": {"host": "127.0.0.1", "port": 8000, "max_body_bytes": 1 << 20, "engine_timeout": 30.0,
                "max_connections": 512, "max_connections_per_client": 64},
    "supervisor": {"restart_backoff": 0.5, "max_restarts": 3, "health_interval": 1.0, "drain_timeout": 10.0},
    "auth": {"keys": [{"key": "sk-one", "models": ["chat", "emb"]}, {"key": "sk-two"}], "keys_env": "FLEET_KEYS"},
    "ui": {"enabled": True, "show_prompts": False},
    "responses": {"max_age_days": 7.0, "max_stored": 100},
    "sets": [{"name": "turns", "models": ["a", "b"], "min_awake": 5.0}],
    "models": [
        {"name": "chat", "source": "default", "gpus": [], "port": 5001, "max_model_len": 2048, "kv_cache_gib": 1,
         "defaults": {"temperature": 0.7, "max_tokens": 64}, "limits": {"max_concurrent": 8, "max_queued": 16},
         "tool_parser": "hermes", "engine_args": {"enable_prefix_caching": True}},
        {"name": "big", "source": "org/big-model", "gpus": [0, 1], "port": 5002, "gpu_memory_utilization": 0.45,
         "replicas": 1, "routing": "prefix"},
        {"name": "emb", "source": "org/embedder", "gpus": [2], "port": 5003, "gpu_memory_utilization": 0.2,
         "task": "embed"},
        {"name": "a", "source": "org/a", "gpus": [3], "port": 5004, "gpu_memory_utilization": 0.5,
         "start": "on_demand", "when_idle": "sleep", "idle_after": 60.0},
        {"name": "b", "source": "org/b", "gpus": [3], "port": 5005, "gpu_memory_utilization": 0.5,
         "start": "on_demand", "when_idle": "stop", "idle_after": 30.0},
        {"name": "tuned", "source": "org/base", "port": 5006, "lora": True, "adapters": {"sql": "ADAPTER"},
         "placements": [{"gpus": [2], "port": 5010}, {"gpus": [2], "port": 5011}], "gpu_memory_utilization": 0.3,
         "routing": "session", "session_header": "x-session"},
        {"name": "far", "url": "http://10.0.0.9:8001", "port": 8001, "source": "org/far"},
    ],
}

# names the file knows, to be put where they do not belong
FIELDS = sorted({*BASE, *BASE["gateway"], *BASE["supervisor"], *BASE["ui"], "name", "source", "gpus", "port",
                 "replicas", "placements", "url", "start", "awake", "min_awake", "defaults", "limits", "models",
                 "engine_args", "tensor_parallel_size", "pipeline_parallel_size", "multi_node", "sleep_level",
                 "priority", "max_loras", "chat_template", "reasoning_parser", "dtype", "enforce_eager",
                 "tls_certfile", "keys_file", "store_path", "cluster", "system", "address"})

# strings that mean something somewhere in the file (names of models and sets, choices, paths, urls)
WORDS = ["", " ", "auto", "default", "none", "-1", "0", "1.5", "http://", "http://x:0", "http://10.0.0.9:8002", "/", "~",
         "~nobody/x", "prefix", "session", "least-loaded", "on_demand", "launch", "sleep", "stop", "keep", "embed",
         "generate", "ray", "auto", "float16", "../x", "chat", "big", "emb", "a", "b", "tuned", "far", "turns", "hermes",
         "no-such-parser", "\u00e9\u4e2d", "a" * 300]
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 1, 65535, 65536, 2**31, 2**63 - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.95, 1.0, 1e-300, 1e300]),
    st.text(max_size=12),
    st.sampled_from(WORDS),
    st.dates(),
    st.datetimes(),
    st.times(),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=8))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(keys, inner, max_size=3)), max_leaves=6)


def nudged(value: Any) -> st.SearchStrategy[Any]:
    """A value of the same kind as `value`, near it or at a limit: what a person edits a file to."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int):
        return st.one_of(st.integers(-2, 8), st.integers(value - 3, value + 3), st.sampled_from([0, 65535, 65536, 2**31]))
    if isinstance(value, float):
        return st.one_of(st.floats(-1.0, 2.0), st.sampled_from([0.0, 0.5, 0.95, 0.96, 1.0, 1e9]))
    if isinstance(value, str):
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=6).map(lambda t: value + t))
    if isinstance(value, list):
        return st.one_of(st.just([]), st.just(value + value[:1]), st.just(value[::-1]), st.lists(st.integers(-1, 4), max_size=4))
    return values


def places(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key and array element of the document, as paths."""
    found: list[tuple[Any, ...]] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        found.append((*at, k))
        found += places(v, (*at, k))
    return found


def tables(doc: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every table of the document (the root included), as paths."""
    found = [at] if isinstance(doc, dict) else []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        found += tables(v, (*at, k))
    return found


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """BASE with its adapter a real PEFT adapter's directory (its config: a rank-8 LoRA of org/base)."""
    folder = tmp_path_factory.mktemp("adapter")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8,
                                                            "base_model_name_or_path": "org/base"}))
    doc = copy.deepcopy(BASE)
    doc["models"][5]["adapters"]["sql"] = str(folder)
    return doc


def reach(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def damaged(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["remove", "replace", "nudge", "nudge", "add"]))
        if kind == "add":
            at = draw(st.sampled_from(tables(doc)))
            reach(doc, at)[draw(keys)] = draw(values)
            continue
        options = places(doc)
        if not options:
            break
        path = draw(st.sampled_from(options))
        parent = reach(doc, path[:-1])
        if kind == "remove":
            del parent[path[-1]]
        elif kind == "nudge":
            parent[path[-1]] = draw(nudged(parent[path[-1]]))
        else:
            parent[path[-1]] = draw(values)
    return doc


def toml_text(doc: dict[str, Any]) -> str | None:
    """The document as TOML, or None where TOML cannot say it (an array of tables beside values)."""
    try:
        return tomli_w.dumps(doc)
    except (TypeError, ValueError):
        return None


def use(config: FleetConfig, path: Path) -> None:
    """What `fleet check` and `fleet launch` make of a valid file before anything starts: the
    machine's checks, the file in effect (the status page's), each engine's vLLM arguments, and the
    fleet's books (its engines' owners, the models as the gateway serves them, the sets), built and
    never started."""
    check_machine(config, path, gpus=[0, 1, 2, 3], probe_ports=False, env={})
    effective_toml(config)
    for m in config.models:
        for r in m.replica_configs():
            engine_arguments(r, "/models/x")
    try:
        Fleet(config, console=Console(file=io.StringIO()))
    except ConfigError as e:  # a gateway others can reach, without keys
        assert "[auth] open" in str(e) or "key" in str(e), e


def test_the_base_file_is_valid(tmp_path: Path, base: dict[str, Any]) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps(base))
    config = load_config(path)
    assert [m.name for m in config.models] == [m["name"] for m in BASE["models"]]
    use(config, path)


def test_a_damaged_field_is_named_by_file_model_and_field(tmp_path: Path, base: dict[str, Any]) -> None:
    """The property below, once by hand: a number given as a string."""
    doc = copy.deepcopy(base)
    doc["models"][1]["gpu_memory_utilization"] = "lots"
    path = tmp_path / "fleet.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}:")
    assert 'model "big"' in str(e.value) and "gpu_memory_utilization" in str(e.value)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow],
          derandomize=os.environ.get("FLEET_FUZZ_RANDOM") != "1", database=None)
@given(data=st.data())
def test_a_damaged_fleet_file_is_a_config_error_naming_the_file_or_a_fleet(tmp_path: Path, base: dict[str, Any],
                                                                          data: st.DataObject) -> None:
    doc = data.draw(damaged(base))
    text = toml_text(doc)
    if text is None:
        event("not TOML")
        return
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    try:
        config = load_config(path)
    except ConfigError as e:
        message = str(e)
        assert message.startswith(f"{path}:"), message
        assert message.strip() != f"{path}:", message
        for line in message.splitlines()[1:]:
            assert PROBLEM.match(line), f"{line!r} names no model, set or field:\n{message}"
        event("refused")
        return
    event("valid")
    use(config, path)
