"""vLLM's engine arguments for one model of the fleet, and the engine built from them."""

from __future__ import annotations

from typing import Any

from fleet.config.model import ModelConfig
from fleet.config.placement import engine_dtype
from fleet.config.sources import resolve

MAX_LOGPROBS = 40  # beam search asks for 2 * width alternatives per step


def build_engine(cfg: ModelConfig) -> Any:
    """Resolve the source and start vLLM's AsyncLLM for one model, with `vllm serve`'s defaults.

    vLLM picks scheduler defaults by usage context: `vllm serve` is OPENAI_API_SERVER (on an
    H100/H200: 1024 sequences at once, 8192 batched tokens), while AsyncLLM's own default,
    ENGINE_CONTEXT, falls back to 128 sequences and 2048 tokens on every device. fleet serves the
    same OpenAI API, so its engine gets the same defaults; `engine_args` in fleet.toml still wins.
    """
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    model = resolve(cfg.source)
    args: dict[str, Any] = dict(
        model=model,
        served_model_name=cfg.name,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.memory_fraction,
        enforce_eager=cfg.eager,
        dtype=engine_dtype(cfg)[0],
        disable_log_stats=True,
        max_logprobs=MAX_LOGPROBS,
    )
    if cfg.kv_cache_bytes is not None:
        args["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
    args.update(cfg.engine_args)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER)
