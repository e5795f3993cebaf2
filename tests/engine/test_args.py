"""What the engine process hands to vLLM: the arguments fleet.toml implies, and `vllm serve`'s defaults.

vLLM chooses scheduler limits by usage context. On this CPU both contexts give the same numbers,
so the behaviour itself is checked on a GPU (docs/benchmarks.md: the engine log of `fleet launch`
on an H100 shows `vllm serve`'s 8192 batched tokens); here, that the engine asks for that context
with the real vLLM classes, and that fleet.toml's `engine_args` still win over every default.
A replica across nodes (a [cluster]'s multi_node) gets vLLM's Ray executor and its pipeline stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fleets import free_port

from fleet.config.model import ModelConfig
from fleet.engine.args import MAX_LOGPROBS, build_engine, engine_arguments, worker_in_engine_core


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What `build_engine` passes to AsyncLLM.from_engine_args (no engine is started)."""
    from vllm.v1.engine.async_llm import AsyncLLM

    seen: dict[str, Any] = {}

    def capture(engine_args: Any, **kwargs: Any) -> str:
        seen.update(kwargs, engine_args=engine_args)
        return "engine"

    monkeypatch.setattr(AsyncLLM, "from_engine_args", capture)
    return seen


def test_engine_gets_the_scheduler_defaults_of_vllm_serve(built: dict[str, Any], tiny_model: Path) -> None:
    from vllm.usage.usage_lib import UsageContext

    cfg = ModelConfig(name="m", source=str(tiny_model), port=free_port())
    assert build_engine(cfg) == "engine"
    assert built.get("usage_context") is UsageContext.OPENAI_API_SERVER
    args = built["engine_args"]
    assert args.max_num_seqs is None and args.max_num_batched_tokens is None  # left to vLLM's defaults
    assert (args.model, args.served_model_name, args.max_logprobs) == (str(tiny_model), "m", MAX_LOGPROBS)


def test_engine_args_from_fleet_toml_win_over_the_defaults(built: dict[str, Any], tiny_model: Path) -> None:
    cfg = ModelConfig(name="m", source=str(tiny_model), port=free_port(),
                      engine_args={"max_num_seqs": 64, "max_num_batched_tokens": 4096})
    build_engine(cfg)
    assert (built["engine_args"].max_num_seqs, built["engine_args"].max_num_batched_tokens) == (64, 4096)


@pytest.mark.parametrize(("fields", "bind", "expected"), [
    ({}, "0", True),  # a CPU engine fleet bound to its own cores: its worker runs in the EngineCore
    ({}, "2-3", True),
    ({}, "", False),  # vLLM's cores to choose ("auto"): vLLM's own worker process, as `vllm serve`
    ({}, "auto", False),
    ({"gpus": [0]}, "0", False),  # a GPU engine: vLLM's default executor
    ({"pipeline_parallel_size": 2}, "0-1", False),  # several workers (pipeline stages)
])
def test_a_cpu_engine_on_its_own_cores_runs_its_worker_in_the_engine_core(
    fields: dict[str, Any], bind: str, expected: bool
) -> None:
    cfg = ModelConfig(name="m", source="default", port=8001, **fields)
    assert worker_in_engine_core(cfg, {"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {}) is expected


def test_a_replica_across_nodes_runs_vllms_ray_executor_with_its_stages() -> None:
    cfg = ModelConfig(name="big", source="default", port=5001, gpus=list(range(4)), gpu_count=True, multi_node=True,
                      pipeline_parallel_size=2)
    args = engine_arguments(cfg, "/models/big")
    assert args["distributed_executor_backend"] == "ray"
    assert (args["tensor_parallel_size"], args["pipeline_parallel_size"]) == (2, 2)
    one_node = engine_arguments(cfg.model_copy(update={"multi_node": False}), "/models/big")
    assert "distributed_executor_backend" not in one_node  # vLLM's own choice on one node (multiprocessing)
