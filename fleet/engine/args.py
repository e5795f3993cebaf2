"""vLLM's engine arguments for one model of the fleet, and the engine built from them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fleet.config.model import ModelConfig
from fleet.config.schema import PLACEMENT_GROUP_ENV
from fleet.machine.probe import engine_dtype
from fleet.run.process import bound_cores
from fleet.sources import resolve

MAX_LOGPROBS = 40  # beam search asks for 2 * width alternatives per step


def engine_arguments(cfg: ModelConfig, model: str) -> dict[str, Any]:
    """vLLM's AsyncEngineArgs for one replica of `cfg`, `model` its resolved source: fleet.toml's
    settings, then its `engine_args` over them. A replica across a cluster's nodes (`multi_node`)
    runs its GPU workers through vLLM's Ray executor."""
    args: dict[str, Any] = dict(
        model=model,
        served_model_name=cfg.name,
        tensor_parallel_size=cfg.tensor_parallel_size,
        pipeline_parallel_size=cfg.pipeline_parallel_size,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.memory_fraction,
        enforce_eager=cfg.eager,
        dtype=engine_dtype(cfg)[0],
        disable_log_stats=True,
        max_logprobs=MAX_LOGPROBS,
    )
    if cfg.kv_cache_bytes is not None:
        args["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
    if cfg.multi_node and cfg.gpus:
        args["distributed_executor_backend"] = "ray"
    if cfg.reasoning_parser:  # structured outputs apply to the answer, after the reasoning (as `vllm serve --reasoning-parser`)
        args["reasoning_parser"] = cfg.reasoning_parser
    if cfg.task == "embed":  # vLLM's pooling runner; a generative model is converted to embed (last-token pooling)
        args["runner"] = "pooling"
        args["convert"] = "embed"
    args.update(cfg.engine_args)
    return args


def worker_in_engine_core(cfg: ModelConfig, env: Mapping[str, str]) -> bool:
    """Whether vLLM runs this engine's one model worker inside its EngineCore process (its
    uniprocess executor, `VLLM_ENABLE_V1_MULTIPROCESSING=0`) rather than in a process of its own:
    a CPU engine without tensor or pipeline parallelism whose cores are given
    (`VLLM_CPU_OMP_THREADS_BIND`, which fleet sets for each of several CPU engines).

    vLLM's CPU build starts a worker process so that it can pin OpenMP threads to cores; an
    engine kept to its own cores (process.keep_to_bound_cores, inherited by the EngineCore)
    needs no other pinning, and one process fewer starts: the tiny test model was ready in
    31.7 s instead of 49.4 s on a 2-core VM, the same greedy answer. Where the cores are vLLM's
    to choose ("auto", one engine), vLLM's own way stays. `VLLM_ENABLE_V1_MULTIPROCESSING` set
    in the environment wins either way."""
    return (cfg.on_cpu and cfg.tensor_parallel_size * cfg.pipeline_parallel_size == 1
            and bound_cores(env.get("VLLM_CPU_OMP_THREADS_BIND", "")) is not None)


def build_engine(cfg: ModelConfig, env: Mapping[str, str] = os.environ) -> Any:
    """Resolve the source and start vLLM's AsyncLLM for one model, with `vllm serve`'s defaults.

    vLLM picks scheduler defaults by usage context: `vllm serve` is OPENAI_API_SERVER (on an
    H100/H200: 1024 sequences at once, 8192 batched tokens), while AsyncLLM's own default,
    ENGINE_CONTEXT, falls back to 128 sequences and 2048 tokens on every device. fleet serves the
    same OpenAI API, so its engine gets the same defaults; `engine_args` in fleet.toml still wins.

    A replica across nodes finds its placement group by the id in $FLEET_RAY_PLACEMENT_GROUP (the
    launcher made it, one GPU per bundle; the engine runs in its first bundle) and hands it to
    vLLM, whose Ray executor starts a worker in each bundle.
    """
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    engine_args = AsyncEngineArgs(**engine_arguments(cfg, resolve(cfg.source)))
    context = UsageContext.OPENAI_API_SERVER
    if group := env.get(PLACEMENT_GROUP_ENV):
        vllm_config = engine_args.create_engine_config(usage_context=context)
        vllm_config.parallel_config.placement_group = placement_group(group)
        return AsyncLLM.from_vllm_config(vllm_config, usage_context=context)
    return AsyncLLM.from_engine_args(engine_args, usage_context=context)


def placement_group(group_id: str, bundles: list[dict[str, float]] | None = None) -> Any:
    """The Ray placement group with id `group_id` (hex), the one the launcher made for this replica,
    as vLLM takes it. This process never joins the cluster itself: vLLM forks its EngineCore from
    here, and a forked Ray connection hangs; the EngineCore joins (RAY_ADDRESS) and reads the rest."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID.from_hex(group_id), bundle_cache=bundles)
