"""fleet.toml (fleet.config.load, fleet.config.schema, fleet.config.model): the schema, the
cross-model rules, the error messages, the override layers and the defaults.

Every error must name the file, the model and the field, so each test checks all three. The rules
of a fleet on a [cluster] are tests/cluster/test_asks.py's, those of replicas and placements
tests/gateway/routing/test_replicas.py's; `fleet check` (the machine's checks) is
tests/machine/test_check.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleets import ROOT

from fleet.config.load import load_config, parse_config
from fleet.config.model import CPU_KV_CACHE_GIB, GIB, SamplingDefaults
from fleet.config.schema import FleetConfig
from fleet.errors import ConfigError

FILE = "fleet-under-test.toml"


pytestmark = pytest.mark.usefixtures("no_fleet_environment")  # a FLEET_GATEWAY__PORT in the shell changes nothing here


def model(**fields: Any) -> dict[str, Any]:
    """One [[models]] entry, valid unless `fields` breaks it."""
    return {"name": "small", "source": "default", "port": 5001, **fields}


def parse(raw: dict[str, Any], **overrides: Any) -> FleetConfig:
    return parse_config(raw, FILE, **overrides)


def config_error(raw: dict[str, Any], **overrides: Any) -> str:
    """The message of the ConfigError that `raw` must raise."""
    with pytest.raises(ConfigError) as e:
        parse(raw, **overrides)
    return str(e.value)


def assert_names(message: str, *parts: str) -> None:
    """The message names the file and every part (model, field, reason)."""
    assert message.startswith(f"{FILE}: invalid fleet file"), message
    for part in parts:
        assert part in message, f"{part!r} not in:\n{message}"


# --- the shipped example --------------------------------------------------------------------


def test_shipped_fleet_toml_loads_with_the_default_model() -> None:
    config = load_config(ROOT / "fleet.toml")
    assert config.gateway.port == 8000
    [m] = config.models
    assert m.source == "default"
    assert m.name == "smollm2-135m-instruct"
    assert m.on_cpu
    assert config.model("smollm2-135m-instruct") is m
    assert config.model("nope") is None


def test_load_config_reads_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[gateway]\nport = 8100\n\n[[models]]\nname = "a"\nsource = "org/a"\ngpus = [0, 1]\nport = 5001\n'
    )
    config = load_config(path)
    assert config.gateway.port == 8100
    assert config.models[0].gpus == [0, 1]


def test_empty_file_is_a_fleet_without_models(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text("")
    config = load_config(path)
    assert config.models == []
    assert (config.gateway.host, config.gateway.port) == ("127.0.0.1", 8000)


# --- cross-model rules ----------------------------------------------------------------------


def test_duplicate_model_names() -> None:
    msg = config_error({"models": [model(), model(port=5002)]})
    assert_names(msg, 'model "small" (models[1])', 'field "name"', "duplicate name", "models[0]")


def test_duplicate_ports() -> None:
    msg = config_error({"models": [model(name="a"), model(name="b")]})
    assert_names(msg, 'model "b" (models[1])', 'field "port"', '5001 is also the port of model "a"')


def test_model_port_equal_to_gateway_port() -> None:
    msg = config_error({"gateway": {"port": 8000}, "models": [model(port=8000)]})
    assert_names(msg, 'model "small" (models[0])', 'field "port"', "8000 is the gateway's port")


def test_gpu_shared_without_memory_fractions_is_refused() -> None:
    msg = config_error({"models": [model(name="a", gpus=[0, 1]), model(name="b", port=5002, gpus=[1, 2])]})
    assert_names(msg, 'model "b" (models[1])', 'field "gpu_memory_utilization"', 'GPU 1 is shared by "a", "b"')
    assert 'model "a" (models[0])' in msg


def test_gpu_sharing_names_each_replica_and_asks_each_model_once() -> None:
    msg = config_error({"models": [model(name="a", gpus=[0]),
                                   model(name="b", port=5002, placements=[{"gpus": [0], "port": 5002},
                                                                          {"gpus": [0], "port": 5003}])]})
    assert 'GPU 0 is shared by "a", "b.0", "b.1"' in msg
    assert msg.count('model "b" (models[1]), field "gpu_memory_utilization"') == 1


def test_an_error_names_places_in_the_file_as_its_reader_writes_them() -> None:
    msg = config_error({"models": [model(placements=[{"gpus": [0], "port": 5001}, {"gpus": ["x"], "port": 5002}]),
                                   model(name="b", port=5003, **{"bad\nkey": 1})]})
    assert_names(msg, 'model "small" (models[0]), field "placements[1].gpus[0]": Input should be a valid integer',
                 """model "b" (models[1]), field "'bad\\nkey'": unknown field (typo?)""")


def test_a_rule_of_the_whole_model_is_said_without_pydantics_prefix() -> None:
    msg = config_error({"models": [model(when_idle="sleep")]})
    assert_names(msg, 'model "small" (models[0]): when_idle = "sleep" needs idle_after')
    assert "Value error" not in msg


def test_a_placement_lists_each_gpu_once() -> None:
    msg = config_error({"models": [model(placements=[{"gpus": [2, 2], "port": 5001}])]})
    assert_names(msg, 'model "small" (models[0]), field "placements[0].gpus": a GPU id is listed twice')


@pytest.mark.parametrize("field", ["source", "chat_template"])
def test_a_path_longer_than_a_file_system_holds_is_refused_naming_the_field(field: str) -> None:
    msg = config_error({"models": [model(**{field: "/models/" + "a" * 300})]})
    assert_names(msg, f'model "small" (models[0]), field "{field}": /models/aaa', "is at most 255 bytes")


def test_an_adapter_path_longer_than_a_file_system_holds_is_refused_naming_the_adapter() -> None:
    msg = config_error({"models": [model(adapters={"sql": "a" * 300})]})
    assert_names(msg, 'model "small" (models[0]), field "adapters.sql": aaa', "is at most 255 bytes")


def test_each_problem_is_one_line_whatever_the_file_quotes() -> None:
    msg = config_error({"models": [model(name="two\nlines", when_idle="sleep"), model(name="b", port=5002, url=" ")]})
    assert_names(msg, 'model "two\\nlines" (models[0]): when_idle', """model "b" (models[1]), field "url": ' ' is not http://HOST:PORT""")
    assert len(msg.splitlines()) == 3


def test_a_model_that_is_not_a_table_is_named_by_its_place() -> None:
    msg = config_error({"models": [model(), "small"]})
    assert_names(msg, "models[1]: should be a table")


def test_gpu_shared_with_fractions_summing_to_at_most_095_is_allowed() -> None:
    cfg = parse_config({"models": [model(name="a", gpus=[0], gpu_memory_utilization=0.5),
                                   model(name="b", port=5002, gpus=[0], gpu_memory_utilization=0.45)]})
    assert [m.memory_fraction for m in cfg.models] == [0.5, 0.45]


def test_gpu_shared_with_fractions_over_095_is_refused() -> None:
    msg = config_error({"models": [model(name="a", gpus=[0], gpu_memory_utilization=0.5),
                                   model(name="b", port=5002, gpus=[0], gpu_memory_utilization=0.5)]})
    assert_names(msg, 'model "b" (models[1])', 'field "gpu_memory_utilization"', "1.00 of its memory", "at most 0.95")


def test_every_cross_model_problem_is_reported_at_once() -> None:
    msg = config_error({"models": [model(gpus=[0]), model(gpus=[0])]})
    assert_names(msg, "duplicate name", "is also the port", "GPU 0 is shared")
    assert len(msg.splitlines()) == 5


# --- per-field rules ------------------------------------------------------------------------


def test_unknown_key_in_a_model_is_a_typo() -> None:
    msg = config_error({"models": [model(prot=5001)]})
    assert_names(msg, 'model "small" (models[0])', 'field "prot"', "unknown field (typo?)")


def test_unknown_key_at_top_level() -> None:
    msg = config_error({"modles": [model()]})
    assert_names(msg, 'field "modles"', "unknown field (typo?)")


def test_unknown_key_in_gateway() -> None:
    msg = config_error({"gateway": {"prot": 9000}})
    assert_names(msg, 'field "gateway.prot"', "unknown field (typo?)")


def test_unknown_key_in_model_defaults() -> None:
    msg = config_error({"models": [model(defaults={"tempreature": 0.5})]})
    assert_names(msg, 'model "small" (models[0])', 'field "defaults.tempreature"', "unknown field (typo?)")


def test_model_port_of_wrong_type() -> None:
    msg = config_error({"models": [model(port="abc")]})
    assert_names(msg, 'model "small" (models[0])', 'field "port"', "valid integer")


def test_gateway_port_of_wrong_type() -> None:
    msg = config_error({"gateway": {"port": "abc"}})
    assert_names(msg, 'field "gateway.port"', "valid integer")


NO_HOME = "~fleet-no-such-user/x"  # a `~user` this machine has no home directory for


@pytest.mark.parametrize(("raw", "field"), [
    ({"models": [model(source=NO_HOME)]}, 'model "small" (models[0]), field "source"'),
    ({"models": [model(chat_template=NO_HOME)]}, 'model "small" (models[0]), field "chat_template"'),
    ({"models": [model(adapters={"a": NO_HOME})]}, "adapters.a"),
    ({"models": [model()], "gateway": {"tls_certfile": NO_HOME, "tls_keyfile": NO_HOME}}, 'field "gateway.tls_certfile"'),
    ({"models": [model()], "gateway": {"engine_token_file": NO_HOME}}, 'field "gateway.engine_token_file"'),
    ({"models": [model()], "auth": {"keys_file": NO_HOME}}, 'field "auth.keys_file"'),
    ({"models": [model()], "responses": {"store_path": NO_HOME}}, 'field "responses.store_path"'),
])
def test_a_path_under_a_user_this_machine_lacks_is_refused_naming_the_field(raw: dict[str, Any], field: str) -> None:
    """pathlib raises a bare RuntimeError for it: `fleet check` showed a traceback."""
    assert_names(config_error(raw), field, "~fleet-no-such-user names no home directory on this machine")


def test_an_adapter_without_a_path_is_refused() -> None:
    assert_names(config_error({"models": [model(adapters={"a": ""})]}), "adapters.a", "not empty")


def test_gpus_of_wrong_type() -> None:
    msg = config_error({"models": [model(gpus="0")]})
    assert_names(msg, 'model "small" (models[0])', 'field "gpus"', "valid list")
    msg = config_error({"models": [model(gpus=0)]})  # a count: a cluster's form (tests/cluster/test_asks.py)
    assert_names(msg, 'model "small" (models[0])', 'field "gpus"', "only a fleet on a [cluster]", "gpus = []")


def test_boolean_port_is_a_type_error() -> None:
    """`port = true` is a typo, not port 1 (pydantic's lax mode turns true into 1)."""
    msg = config_error({"models": [model(port=True)]})
    assert_names(msg, 'model "small" (models[0])', 'field "port"')


def test_port_out_of_range() -> None:
    msg = config_error({"models": [model(port=70000)]})
    assert_names(msg, 'model "small" (models[0])', 'field "port"', "65535")


def test_gpu_id_listed_twice() -> None:
    msg = config_error({"models": [model(gpus=[1, 1])]})
    assert_names(msg, 'model "small" (models[0])', 'field "gpus"', "a GPU id is listed twice")


def test_negative_gpu_id() -> None:
    msg = config_error({"models": [model(gpus=[-1])]})
    assert_names(msg, 'model "small" (models[0])', 'field "gpus"', "GPU ids are >= 0")


@pytest.mark.parametrize("missing", ["name", "source", "port"])
def test_missing_required_field(missing: str) -> None:
    entry = model()
    del entry[missing]
    msg = config_error({"models": [entry]})
    where = "models[0]" if missing == "name" else 'model "small" (models[0])'
    assert_names(msg, where, f'field "{missing}"', "Field required")


def test_empty_model_name() -> None:
    msg = config_error({"models": [model(name="")]})
    assert_names(msg, "models[0]", 'field "name"')


def test_memory_fraction_above_one() -> None:
    msg = config_error({"models": [model(gpu_memory_utilization=1.5)]})
    assert_names(msg, 'model "small" (models[0])', 'field "gpu_memory_utilization"')


def test_sampling_default_out_of_range() -> None:
    msg = config_error({"models": [model(defaults={"temperature": 3})]})
    assert_names(msg, 'model "small" (models[0])', 'field "defaults.temperature"')


def test_sampling_default_top_k_zero_is_rejected() -> None:
    """A default every request would then fail with (top_k must be -1 or >= 1) must fail at load."""
    msg = config_error({"models": [model(defaults={"top_k": 0})]})
    assert_names(msg, 'model "small" (models[0])', 'field "defaults.top_k"')


def test_models_must_be_a_list() -> None:
    msg = config_error({"models": {"name": "small"}})
    assert_names(msg, 'field "models"')


# --- the file itself ------------------------------------------------------------------------


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[gateway\nport = 8000\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: not valid TOML")
    assert "line 1" in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="file not found") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_errors_from_load_config_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[[models]]\nname = "a"\nsource = "default"\nprot = 5001\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: invalid fleet file")
    assert 'model "a" (models[0]), field "prot"' in str(e.value)


def test_config_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    """`fleet check --config some/dir` must print an error, not an IsADirectoryError traceback."""
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(tmp_path) in str(e.value)


# --- layers: file < FLEET_ environment < CLI ------------------------------------------------


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_GATEWAY__PORT", "9001")
    config = parse({"gateway": {"host": "0.0.0.0", "port": 8001}})
    assert config.gateway.port == 9001
    assert config.gateway.host == "0.0.0.0"  # the rest of [gateway] still comes from the file


def test_cli_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_GATEWAY__PORT", "9001")
    monkeypatch.setenv("FLEET_GATEWAY__HOST", "10.0.0.1")
    config = parse({"gateway": {"port": 8001}}, port=9002)
    assert config.gateway.port == 9002
    assert config.gateway.host == "10.0.0.1"  # not overridden on the command line


def test_cli_overrides_the_file() -> None:
    config = parse({"gateway": {"host": "127.0.0.1", "port": 8001}}, host="0.0.0.0", port=None)
    assert (config.gateway.host, config.gateway.port) == ("0.0.0.0", 8001)


def test_cli_override_is_checked_against_model_ports() -> None:
    msg = config_error({"models": [model(port=5001)]}, port=5001)
    assert_names(msg, 'model "small" (models[0])', "5001 is the gateway's port")


def test_bad_environment_value_names_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_GATEWAY__PORT", "abc")
    msg = config_error({})
    assert_names(msg, 'field "gateway.port"', "valid integer")


@pytest.mark.parametrize(("name", "how"), [("FLEET_MODELS", "give the whole list as JSON"),
                                           ("FLEET_GATEWAY", "or one of its fields as FLEET_GATEWAY__FIELD")])
def test_a_variable_for_a_whole_table_that_is_not_json_is_named(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                how: str) -> None:
    monkeypatch.setenv(name, "[1")
    msg = config_error({"models": [model()]})
    assert msg.startswith(f"{FILE}: the environment variable {name} ") and "is not JSON" in msg and how in msg


def test_models_from_the_environment_are_not_named_by_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_MODELS", '[{"name": "env", "source": "default", "port": 5001, "gpus": "a"}, {"port": 1}]')
    msg = config_error({"models": [model(), model(name="other", port=5002)]})
    assert_names(msg, 'model "env" (models[0]), field "gpus"', 'models[1], field "name": Field required')
    assert "small" not in msg and "other" not in msg


def test_other_fleet_variables_are_not_config_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CACHE_DIR", "/tmp/fleet-cache")
    monkeypatch.setenv("FLEET_LOG_DIR", "/tmp/fleet-logs")
    assert parse({"models": [model()]}).models[0].name == "small"


# --- defaults -------------------------------------------------------------------------------


def test_cpu_model_defaults() -> None:
    m = parse({"models": [model()]}).models[0]
    assert m.on_cpu
    assert m.memory_fraction == 0.3
    assert m.eager is True
    assert m.tensor_parallel_size == 1
    assert (m.host, m.dtype, m.start_timeout, m.max_model_len) == ("127.0.0.1", "auto", 600.0, None)


def test_gpu_model_defaults() -> None:
    m = parse({"models": [model(gpus=[2, 3, 4, 5])]}).models[0]
    assert not m.on_cpu
    assert m.memory_fraction == 0.9
    assert m.eager is False
    assert m.tensor_parallel_size == 4
    assert m.kv_cache_bytes is None  # vLLM sizes the KV cache from gpu_memory_utilization


def test_cpu_model_gets_a_fixed_kv_cache_unless_a_memory_fraction_is_set() -> None:
    assert parse({"models": [model()]}).models[0].kv_cache_bytes == int(CPU_KV_CACHE_GIB * GIB)
    assert parse({"models": [model(gpu_memory_utilization=0.4)]}).models[0].kv_cache_bytes is None


def test_explicit_kv_cache_size_wins() -> None:
    cpu = parse({"models": [model(kv_cache_gib=2, gpu_memory_utilization=0.4)]}).models[0]
    gpu = parse({"models": [model(gpus=[0], kv_cache_gib=0.5)]}).models[0]
    assert (cpu.kv_cache_bytes, gpu.kv_cache_bytes) == (2 * GIB, GIB // 2)


def test_kv_cache_size_must_be_positive() -> None:
    msg = config_error({"models": [model(kv_cache_gib=0)]})
    assert_names(msg, 'model "small" (models[0])', 'field "kv_cache_gib"', "greater than 0")


def test_explicit_memory_and_eager_win_over_device_defaults() -> None:
    cpu = parse({"models": [model(gpu_memory_utilization=0.5, enforce_eager=False)]}).models[0]
    gpu = parse({"models": [model(gpus=[0], gpu_memory_utilization=0.8, enforce_eager=True)]}).models[0]
    assert (cpu.memory_fraction, cpu.eager) == (0.5, False)
    assert (gpu.memory_fraction, gpu.eager) == (0.8, True)


def test_engine_args_pass_through() -> None:
    args = {"enable_prefix_caching": True, "kv_cache_dtype": "fp8", "limits": {"a": [1, 2]}}
    m = parse({"models": [model(engine_args=args)]}).models[0]
    assert m.engine_args == args


def test_sampling_defaults_table() -> None:
    m = parse({"models": [model(defaults={"temperature": 0.7, "max_tokens": 256, "top_k": 40})]}).models[0]
    assert m.defaults == SamplingDefaults(temperature=0.7, max_tokens=256, top_k=40)
    assert m.defaults.top_p is None  # unset fields stay unset: the OpenAI default applies later


def test_sampling_defaults_are_empty_by_default() -> None:
    assert parse({"models": [model()]}).models[0].defaults == SamplingDefaults()
