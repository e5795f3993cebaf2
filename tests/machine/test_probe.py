"""What fleet learns of the machine (fleet.machine.probe): the CPU's flags from /proc/cpuinfo, the
dtype a CPU engine gets for "auto" (bfloat16 only where the CPU multiplies it natively), that GPUs
leave "auto" to vLLM, and the cores given to several CPU engines."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.config.load import parse_config
from fleet.machine.probe import cpu_dtype, cpu_flags, engine_dtype

pytestmark = pytest.mark.usefixtures("no_fleet_environment")  # a FLEET_GATEWAY__PORT in the shell changes nothing here


def test_cpu_dtype_auto_is_bfloat16_only_where_the_cpu_multiplies_it_natively() -> None:
    avx2 = {"sse4_2", "avx", "avx2", "fma"}
    assert cpu_dtype("auto", avx2)[0] == "float32"
    assert "no native bfloat16" in cpu_dtype("auto", avx2)[1]
    assert cpu_dtype("auto", avx2 | {"avx512f", "avx512_bf16"}) == (
        "bfloat16", "auto: this CPU multiplies bfloat16 natively (avx512_bf16)")
    assert cpu_dtype("auto", avx2 | {"amx_tile", "amx_bf16", "avx512_bf16"})[0] == "bfloat16"
    assert cpu_dtype("bfloat16", avx2) == ("bfloat16", "set in the fleet file")  # the file wins
    assert cpu_dtype("float32", {"amx_bf16"})[0] == "float32"


def test_engine_dtype_leaves_auto_to_vllm_on_gpus(tmp_path: Path) -> None:
    cfg = parse_config({"models": [{"name": "g", "source": "org/m", "gpus": [0], "port": 5001},
                                   {"name": "c", "source": "org/m", "port": 5002}]}, tmp_path / "fleet.toml")
    gpu, cpu = cfg.models
    assert engine_dtype(gpu, {"avx2"})[0] == "auto"
    assert engine_dtype(cpu, {"avx2"})[0] == "float32"
    assert engine_dtype(cpu, {"amx_bf16"})[0] == "bfloat16"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_several_cpu_engines_get_disjoint_cores_unless_the_environment_binds_them() -> None:
    from fleet.machine.probe import cpu_bindings

    models = parse_config({"models": [{"name": n, "source": "default", "port": p}
                                      for n, p in (("a", 5001), ("b", 5002), ("c", 5003))]}).models
    assert cpu_bindings(models, range(8), {}) == {"a": "0,1", "b": "2,3", "c": "4,5"}
    assert cpu_bindings(models[:1], range(8), {}) == {}  # one engine: vLLM's own choice
    assert cpu_bindings(models, range(8), {"VLLM_CPU_OMP_THREADS_BIND": "0-3"}) == {}
    assert cpu_bindings(models, [0, 1], {}) == {"a": "0", "b": "1", "c": "0"}  # more engines than cores
