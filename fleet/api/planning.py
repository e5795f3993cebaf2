"""Request -> plan: what the gateway asks the engine for, with every default applied and every
rule (rules.py) checked before any engine sees the request. Pure functions.

What an unset field (or an explicit null) means is decided in one place, `Defaults.pick`, through
one table per model and endpoint (`defaults_table`): the client's value -> the model's default
from fleet.toml ([models.defaults]) -> the endpoint's default -> OpenAI's (`OPENAI_DEFAULTS`).
Each endpoint's own planning (completions.serving.plan_completion, chat.serving.plan_chat) sends
every field through it.

Decision: an *unset* field never breaks a rule. Beam search needs temperature 0, top_p 1 and top_k
-1, so with `use_beam_search` the model's defaults for those do not apply and an unset temperature
means 0; an explicit non-zero temperature is a 400.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from fleet.api.protocol import INT32_MAX, SamplingRequest
from fleet.api.rules import (
    SamplingType,
    allowed_tokens,
    bad_word_list,
    check_beam_search,
    check_beam_search_fields,
    check_best_of,
    check_greedy,
    check_limits,
    check_min_tokens,
    check_not_beam_search,
    check_stream_options,
    check_top_k,
    logit_bias_by_token_id,
    sampling_type,
    stop_sequences,
    structured_outputs,
)
from fleet.config.model import Limits, SamplingDefaults
from fleet.errors import InvalidRequest
from fleet.wire import protocol

# OpenAI's (and vLLM's, for its extensions) meaning of every field a client may leave unset.
# best_of's default is n; max_tokens' is the endpoint's (ENDPOINT_DEFAULTS).
OPENAI_DEFAULTS: Mapping[str, Any] = {
    "n": 1,
    "stream": False,
    "include_usage": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "ignore_eos": False,
    "use_beam_search": False,
    "early_stopping": False,
    "length_penalty": 1.0,
    "echo": False,
    "add_generation_prompt": True,
    "continue_final_message": False,
}
# Each endpoint's own defaults: max_tokens is OpenAI's 16 for completions; for chat, whatever room
# the context leaves (the engine clamps it).
ENDPOINT_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "completions": {"max_tokens": 16},
    "chat": {"max_tokens": INT32_MAX},
}
BEAM_DEFAULTS: Mapping[str, Any] = {"temperature": 0.0}  # what beam search needs, for an unset field
BEAM_IGNORES_MODEL_DEFAULT = frozenset({"temperature", "top_p", "top_k"})
NO_LIMITS = Limits(n=128, best_of=128, prompts=1 << 20, prompt_chars=1 << 40, stop=1 << 20, bad_words=1 << 20)

Prompt = str | list[int] | protocol.Chat


@dataclass(frozen=True, slots=True)
class Defaults:
    """What an unset field means for one request: `table` maps each field to its default."""

    table: Mapping[str, Any]
    beam: bool = False

    def pick(self, name: str, user: Any, default: Any = None) -> Any:
        """The one precedence rule: the user's value, else the table's (`default` where the table
        has none: a default that depends on other fields, as best_of's on n)."""
        if user is not None:
            return user
        value = self.table.get(name)
        return default if value is None else value


@functools.lru_cache(maxsize=256)
def defaults_table(model: SamplingDefaults, endpoint: str, beam: bool) -> Mapping[str, Any]:
    """Every field's default for one model, endpoint and kind of sampling, merged once (not per
    request: reading a pydantic model costs microseconds), highest first: the model's defaults from
    fleet.toml (less those beam search cannot use), the endpoint's, beam search's, OpenAI's."""
    table = {**OPENAI_DEFAULTS, **(BEAM_DEFAULTS if beam else {}), **ENDPOINT_DEFAULTS[endpoint]}
    table.update((name, value) for name, value in model.model_dump().items()
                 if value is not None and not (beam and name in BEAM_IGNORES_MODEL_DEFAULT))
    return MappingProxyType(table)


@dataclass(frozen=True)
class Plan:
    """Everything the gateway does for one completions or chat request."""

    prompts: list[Prompt]
    sampling: protocol.SamplingParams  # n here is the number of candidates the engine samples
    beam: protocol.BeamSearch | None
    n: int  # choices returned per prompt
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # usage in every chunk (vLLM's stream_options.continuous_usage_stats)
    tools: protocol.ToolUse | None = None  # read tool calls out of the answer (chat)
    reasoning: bool = False  # read the reasoning apart (chat, a model with a reasoning parser)
    show_reasoning: bool = True  # and answer it (vLLM's include_reasoning)


def plan(
    req: SamplingRequest,
    defaults: Defaults,
    prompts: list[Prompt],
    *,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    echo: bool = False,
    limits: Limits,
    size: int,
    prompt_param: str = "prompt",
) -> Plan:
    """The sampling rules both endpoints share, in vLLM 0.2.7's order; the engine's sampling and
    beam settings. `defaults` must already know whether this is beam search (`for_request`)."""
    d = defaults
    stream: bool = d.pick("stream", req.stream)
    check_stream_options(stream, req.stream_options is not None)
    n: int = d.pick("n", req.n)
    best_of: int = d.pick("best_of", req.best_of, n)
    temperature: float = d.pick("temperature", req.temperature)
    top_p: float = d.pick("top_p", req.top_p)
    top_k: int = d.pick("top_k", req.top_k)
    early_stopping: bool | Literal["never"] = d.pick("early_stopping", req.early_stopping)
    length_penalty: float = d.pick("length_penalty", req.length_penalty)
    check_top_k(top_k)
    check_best_of(n, best_of, stream)
    check_limits(limits, n=n, best_of=best_of, max_tokens=max_tokens, prompts=len(prompts), size=size,
                 prompt_param=prompt_param)
    kind = sampling_type(d.beam, temperature)
    if kind is SamplingType.BEAM:
        check_beam_search(best_of, temperature, top_p, top_k, early_stopping)
        check_beam_search_fields(req.logit_bias, req.allowed_token_ids, req.bad_words)
        if stream:  # beams are only final at the end (vLLM 0.2.7 never streamed them either)
            raise InvalidRequest("use_beam_search cannot be used with stream: true", param="use_beam_search")
    else:
        check_not_beam_search(req.early_stopping, req.length_penalty)
    if kind is SamplingType.GREEDY:
        check_greedy(best_of, n)
        top_p, top_k = 1.0, -1  # vLLM 0.2.7 resets them for greedy sampling
    chosen_max: int = d.pick("max_tokens", max_tokens)
    if max_tokens is None and limits.max_tokens is not None:  # a default never exceeds the cap
        chosen_max = min(chosen_max, limits.max_tokens)
    min_tokens: int = d.pick("min_tokens", req.min_tokens)
    check_min_tokens(min_tokens, chosen_max, defaulted=max_tokens is None)
    sampling = protocol.SamplingParams(
        n=1 if d.beam else best_of,
        max_tokens=chosen_max,
        clamp_max_tokens=max_tokens is None,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=d.pick("min_p", req.min_p),
        seed=req.seed,
        stop=stop_sequences(req.stop, limits.stop),
        stop_token_ids=req.stop_token_ids or [],
        allowed_token_ids=allowed_tokens(req.allowed_token_ids),
        bad_words=bad_word_list(req.bad_words, limits.bad_words),
        presence_penalty=d.pick("presence_penalty", req.presence_penalty),
        frequency_penalty=d.pick("frequency_penalty", req.frequency_penalty),
        repetition_penalty=d.pick("repetition_penalty", req.repetition_penalty),
        logit_bias=logit_bias_by_token_id(req.logit_bias),
        min_tokens=min_tokens,
        ignore_eos=d.pick("ignore_eos", req.ignore_eos),
        logprobs=logprobs,
        # best_of ranks candidates by cumulative logprob: the engine reports it, nothing per token
        cumulative_logprob=best_of > n and not d.beam,
        prompt_logprobs=prompt_logprobs,
        structured=structured_outputs(req.structured_outputs),
    )
    options = req.stream_options
    include_usage: bool = d.pick("include_usage", options.include_usage if options else None)
    beam = None
    if kind is SamplingType.BEAM:
        beam = protocol.BeamSearch(width=best_of, length_penalty=length_penalty, early_stopping=early_stopping)
    return Plan(
        prompts=prompts,
        sampling=sampling,
        beam=beam,
        n=n,
        echo=echo,
        logprobs=logprobs,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=include_usage and bool(options and options.continuous_usage_stats),
    )


def for_request(req: SamplingRequest, model: SamplingDefaults, endpoint: str) -> Defaults:
    """The defaults of one request to `endpoint` ("completions" or "chat") of a model."""
    beam = bool(req.use_beam_search if req.use_beam_search is not None else OPENAI_DEFAULTS["use_beam_search"])
    return Defaults(defaults_table(model, endpoint, beam), beam)
