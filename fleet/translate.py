"""Pure functions: an OpenAI request -> engine requests, and engine output -> OpenAI objects.

Every rule (rules.py) is checked here, before any engine sees the request. Precedence for a field the client leaves unset (or sends as null) is
written once, in `pick`: user value -> the model's default from fleet.toml -> OpenAI's default.

Decision: an *unset* field never breaks a rule. Beam search needs temperature 0, so with
`use_beam_search` an unset temperature means 0; an explicit non-zero temperature is a 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, Union

import msgspec

from fleet import protocol
from fleet.config import Limits, SamplingDefaults
from fleet.errors import InvalidRequest
from fleet.rules import (
    SamplingType,
    check_beam_search,
    check_best_of,
    check_chat_logprobs,
    check_greedy,
    check_limits,
    check_min_tokens,
    check_logit_bias,
    check_messages,
    check_not_beam_search,
    check_prompt,
    check_response_format,
    check_stop,
    check_stream_options,
    check_suffix,
    check_tools,
    check_top_k,
    sampling_type,
)
from fleet.schemas import (
    INT32_MAX,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    SamplingRequest,
    TopLogprob,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
CHAT_MAX_TOKENS = INT32_MAX  # chat's default: whatever room the context leaves
NO_LIMITS = Limits(n=128, best_of=128, prompts=1 << 20, prompt_chars=1 << 40)
_json = msgspec.json.Encoder()

T = TypeVar("T")


def pick(user: T | None, model_default: T | None, openai_default: T) -> T:
    """The one precedence rule: user value -> model default -> OpenAI default."""
    if user is not None:
        return user
    if model_default is not None:
        return model_default
    return openai_default


Prompt = Union[str, list[int], protocol.Chat]


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


# --- request -> plan -----------------------------------------------------------------------


def plan_sampling(
    req: SamplingRequest,
    defaults: SamplingDefaults,
    *,
    max_tokens: int | None,
    default_max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    limits: Limits,
    prompts: int,
    size: int,
    prompt_param: str = "prompt",
) -> tuple[protocol.SamplingParams, protocol.BeamSearch | None]:
    """The sampling rules shared by completions and chat; returns engine sampling and beam settings."""
    stream = bool(req.stream)
    check_stream_options(stream, req.stream_options is not None)
    beam = bool(req.use_beam_search)
    n = req.n or 1
    best_of = req.best_of if req.best_of is not None else n
    temperature = pick(req.temperature, None if beam else defaults.temperature, 0.0 if beam else 1.0)
    top_p = pick(req.top_p, None if beam else defaults.top_p, 1.0)
    top_k = pick(req.top_k, None if beam else defaults.top_k, -1)
    check_top_k(top_k)
    check_best_of(n, best_of, stream)
    check_limits(limits, n=n, best_of=best_of, max_tokens=max_tokens, prompts=prompts, size=size,
                 prompt_param=prompt_param)
    kind = sampling_type(beam, temperature)
    if kind is SamplingType.BEAM:
        early_stopping = req.early_stopping if req.early_stopping is not None else False
        check_beam_search(best_of, temperature, top_p, top_k, early_stopping)
        if stream:  # beams are only final at the end (vLLM 0.2.7 never streamed them either)
            raise InvalidRequest("use_beam_search cannot be used with stream: true", param="use_beam_search")
    else:
        check_not_beam_search(req.early_stopping, req.length_penalty)
    if kind is SamplingType.GREEDY:
        check_greedy(best_of, n)
        top_p, top_k = 1.0, -1  # vLLM 0.2.7 resets them for greedy sampling
    chosen_max = max_tokens if max_tokens is not None else defaults.max_tokens
    if max_tokens is None and limits.max_tokens is not None:  # a default never exceeds the cap
        chosen_max = min(chosen_max or default_max_tokens, limits.max_tokens)
    # Best-of ranks candidates by cumulative logprob, which the engine computes only with logprobs on.
    engine_logprobs = logprobs if logprobs is not None else (0 if best_of > n else None)
    if max_tokens is not None:
        check_min_tokens(req.min_tokens or 0, max_tokens)
    sampling = protocol.SamplingParams(
        n=1 if beam else best_of,
        max_tokens=chosen_max or default_max_tokens,
        clamp_max_tokens=max_tokens is None,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=pick(req.min_p, defaults.min_p, 0.0),
        seed=req.seed,
        stop=check_stop(req.stop),
        stop_token_ids=req.stop_token_ids or [],
        presence_penalty=pick(req.presence_penalty, defaults.presence_penalty, 0.0),
        frequency_penalty=pick(req.frequency_penalty, defaults.frequency_penalty, 0.0),
        repetition_penalty=pick(req.repetition_penalty, defaults.repetition_penalty, 1.0),
        logit_bias=check_logit_bias(req.logit_bias),
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
        logprobs=engine_logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    beam_search = None
    if kind is SamplingType.BEAM:
        beam_search = protocol.BeamSearch(
            width=best_of,
            length_penalty=req.length_penalty if req.length_penalty is not None else 1.0,
            early_stopping=req.early_stopping if req.early_stopping is not None else False,
        )
    return sampling, beam_search


def _plan(req: SamplingRequest, prompts: list[Prompt], sampling: protocol.SamplingParams,
          beam: protocol.BeamSearch | None, logprobs: int | None, echo: bool = False) -> Plan:
    return Plan(
        prompts=prompts,
        sampling=sampling,
        beam=beam,
        n=req.n or 1,
        echo=echo,
        logprobs=logprobs,
        stream=bool(req.stream),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


def plan_completion(req: CompletionRequest, defaults: SamplingDefaults, limits: Limits = NO_LIMITS) -> Plan:
    """Apply defaults and every rule to a completions request."""
    prompts: list[Prompt] = list(check_prompt(req.prompt))
    check_suffix(req.suffix)
    sampling, beam = plan_sampling(
        req,
        defaults,
        limits=limits,
        prompts=len(prompts),
        size=sum(len(p) for p in prompts),  # type: ignore[arg-type]
        max_tokens=req.max_tokens,
        default_max_tokens=DEFAULT_MAX_TOKENS,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
    )
    return _plan(req, prompts, sampling, beam, req.logprobs, echo=bool(req.echo))


def plan_chat(req: ChatCompletionRequest, defaults: SamplingDefaults, limits: Limits = NO_LIMITS) -> Plan:
    """Apply defaults and every rule to a chat request."""
    check_tools(req.tools, req.tool_choice)
    messages = check_messages(req.messages)
    schema, json_object = check_response_format(req.response_format)
    logprobs = check_chat_logprobs(req.logprobs, req.top_logprobs)
    sampling, beam = plan_sampling(
        req,
        defaults,
        limits=limits,
        prompts=1,
        size=sum(len(m.content) for m in messages),
        prompt_param="messages",
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        default_max_tokens=CHAT_MAX_TOKENS,
        logprobs=logprobs,
    )
    if schema is not None or json_object:
        sampling = msgspec.structs.replace(sampling, json_schema=schema, json_object=json_object)
    chat = protocol.Chat(
        messages=messages,
        add_generation_prompt=req.add_generation_prompt if req.add_generation_prompt is not None else True,
        continue_final_message=bool(req.continue_final_message),
    )
    return _plan(req, [chat], sampling, beam, logprobs)


# --- engine output -> OpenAI ---------------------------------------------------------------


@dataclass
class Candidate:
    """One output sequence of one prompt, accumulated from Delta frames."""

    text: str = ""
    tokens: int = 0
    logprobs: list[protocol.TokenLogprob] | None = None
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0

    def add(self, delta: protocol.Delta) -> None:
        """Fold one Delta frame in."""
        self.text += delta.text
        self.tokens += len(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob


def best(candidates: list[Candidate], n: int) -> list[Candidate]:
    """The n candidates with the highest cumulative logprob (vLLM 0.2.7's best_of), best first."""
    if len(candidates) <= n:
        return candidates
    return sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)[:n]


def finish_reason(reason: str | None) -> str | None:
    """OpenAI knows stop and length; an aborted sequence reports stop."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def completion_logprobs(
    entries: list[protocol.TokenLogprob], top: int | None, text_offset: int = 0
) -> CompletionLogprobs:
    """OpenAI's legacy logprobs object; offsets count characters within the choice's text."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        top_logprobs.append(None if e.top is None else dict(e.top[: (top or 0) + 1]))
        offsets.append(text_offset)
        text_offset += len(e.token)
    return CompletionLogprobs(tokens, token_logprobs, top_logprobs, offsets)


def completion_choice(
    index: int, cand: Candidate, plan: Plan, prompt_text: str, prompt_logprobs: list[protocol.TokenLogprob] | None
) -> CompletionChoice:
    """One choice of a non-streamed response, with the prompt in front when echo is on."""
    text = (prompt_text if plan.echo else "") + cand.text
    logprobs = None
    if plan.logprobs is not None:
        entries = list(prompt_logprobs or []) if plan.echo else []
        entries += cand.logprobs or []
        logprobs = completion_logprobs(entries, plan.logprobs)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(cand.finish_reason))  # type: ignore[arg-type]



def chat_logprobs(entries: list[protocol.TokenLogprob], top: int) -> ChatLogprobs:
    """Chat's logprobs object: per token its logprob, UTF-8 bytes and `top` alternatives."""
    content = [
        ChatTokenLogprob(
            e.token,
            e.logprob if e.logprob is not None else float("-inf"),
            list(e.token.encode()),
            [TopLogprob(t, lp, list(t.encode())) for t, lp in (e.top or [])[:top]],
        )
        for e in entries
    ]
    return ChatLogprobs(content)
