"""Pure functions: an OpenAI request -> engine requests, and engine output -> OpenAI objects.

The sampling rules are vLLM 0.2.7's (the seed's), checked in that order, before any engine
sees the request. Precedence for a field the client leaves unset (or sends as null) is
written once, in `pick`: user value -> the model's default from fleet.toml -> OpenAI's default.

Decision: an *unset* field never breaks a rule. Beam search needs temperature 0, so with
`use_beam_search` an unset temperature means 0; an explicit non-zero temperature is a 400.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, TypeVar

from fleet import protocol
from fleet.config import SamplingDefaults
from fleet.errors import InvalidRequest
from fleet.schemas import CompletionChoice, CompletionLogprobs, CompletionRequest

SAMPLING_EPS = 1e-5
DEFAULT_MAX_TOKENS = 16

T = TypeVar("T")


class SamplingType(enum.Enum):
    BEAM = "beam"
    GREEDY = "greedy"
    RANDOM = "random"


def pick(user: T | None, model_default: T | None, openai_default: T) -> T:
    """The one precedence rule: user value -> model default -> OpenAI default."""
    if user is not None:
        return user
    if model_default is not None:
        return model_default
    return openai_default


@dataclass(frozen=True)
class CompletionPlan:
    """Everything the gateway does for one /v1/completions request."""

    prompts: list[str | list[int]]
    sampling: protocol.SamplingParams  # n here is the number of candidates the engine samples
    beam: protocol.BeamSearch | None
    n: int  # choices returned per prompt
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool

    @property
    def candidates(self) -> int:
        """Sequences generated per prompt (best_of, or the beam width)."""
        return self.beam.width if self.beam else self.sampling.n


# --- rules ---------------------------------------------------------------------------------


def check_prompt(prompt: str | list[Any]) -> list[str | list[int]]:
    """A prompt is a string, strings, token ids, or lists of token ids; never empty."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be an empty list", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, int) for p in prompt):
        return [_check_token_ids(prompt)]
    if all(isinstance(p, list) for p in prompt):
        return [_check_token_ids(p) for p in prompt]
    raise InvalidRequest(
        "prompt must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists, not a mix",
        param="prompt",
    )


def _check_token_ids(ids: list[int]) -> list[int]:
    if not ids:
        raise InvalidRequest("a token-id prompt must not be empty", param="prompt")
    if any(i < 0 for i in ids):
        raise InvalidRequest("token ids must be >= 0", param="prompt")
    return ids


def sampling_type(use_beam_search: bool, temperature: float) -> SamplingType:
    """beam -> greedy -> random, decided in that order (vLLM 0.2.7)."""
    if use_beam_search:
        return SamplingType.BEAM
    if temperature < SAMPLING_EPS:
        return SamplingType.GREEDY
    return SamplingType.RANDOM


def check_best_of(n: int, best_of: int, stream: bool) -> None:
    """best_of >= n, and choosing among candidates (best_of > n) cannot be streamed (OpenAI's rule)."""
    if best_of < n:
        raise InvalidRequest(f"best_of must be >= n, got best_of={best_of} and n={n}", param="best_of")
    if stream and best_of > n:
        raise InvalidRequest("best_of > n cannot be used with stream: true", param="best_of")


def check_top_k(top_k: int) -> None:
    """top_k is -1 (disabled) or at least 1."""
    if top_k != -1 and top_k < 1:
        raise InvalidRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}", param="top_k")


def check_beam_search(
    best_of: int, temperature: float, top_p: float, top_k: int, early_stopping: bool | str
) -> None:
    """Beam search: best_of (the beam width) > 1, temperature 0, top_p 1, top_k -1."""
    if best_of <= 1:
        raise InvalidRequest(
            f"best_of (the beam width) must be greater than 1 when using beam search, got {best_of}",
            param="best_of",
        )
    if temperature > SAMPLING_EPS:
        raise InvalidRequest("temperature must be 0 when using beam search", param="temperature")
    if top_p < 1.0 - SAMPLING_EPS:
        raise InvalidRequest("top_p must be 1 when using beam search", param="top_p")
    if top_k != -1:
        raise InvalidRequest("top_k must be -1 when using beam search", param="top_k")
    if early_stopping not in (True, False, "never"):
        raise InvalidRequest(
            f'early_stopping must be true, false or "never", got {early_stopping!r}', param="early_stopping"
        )


def check_not_beam_search(early_stopping: bool | str | None, length_penalty: float | None) -> None:
    """Without beam search, early_stopping must be false and length_penalty 1."""
    if early_stopping not in (None, False):
        raise InvalidRequest("early_stopping is not effective and must be false when not using beam search", param="early_stopping")
    if length_penalty is not None and abs(length_penalty - 1.0) > SAMPLING_EPS:
        raise InvalidRequest(
            "length_penalty is not effective and must be the default value of 1 when not using beam search",
            param="length_penalty",
        )


def check_greedy(best_of: int, n: int) -> None:
    """Greedy sampling (temperature 0) gives one answer: best_of must be 1."""
    if best_of > 1:
        which = "best_of" if best_of != n else "n"
        raise InvalidRequest(
            f"best_of must be 1 when using greedy sampling (temperature 0), got {which}={best_of}; "
            "raise the temperature to get several different completions",
            param=which,
        )


def check_stream_options(stream: bool, has_options: bool) -> None:
    """stream_options is only allowed with stream: true (OpenAI's rule)."""
    if has_options and not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")


def check_stop(stop: str | list[str] | None) -> list[str]:
    """Stop sequences are non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise InvalidRequest("stop sequences must not be empty strings", param="stop")
    return stops


def check_logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """logit_bias keys are token ids written as strings."""
    if not bias:
        return None
    try:
        parsed = {int(k): float(v) for k, v in bias.items()}
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
    if any(k < 0 for k in parsed):
        raise InvalidRequest("logit_bias keys must be token ids >= 0", param="logit_bias")
    return parsed


def check_suffix(suffix: str | None) -> None:
    """suffix needs fill-in-the-middle support, which no fleet model offers yet."""
    if suffix:
        raise InvalidRequest(
            "suffix is not supported: the model has no fill-in-the-middle tokens fleet can use", param="suffix"
        )


# --- request -> plan -----------------------------------------------------------------------


def plan_completion(req: CompletionRequest, defaults: SamplingDefaults) -> CompletionPlan:
    """Apply defaults and every rule; return what to send to the engine."""
    prompts = check_prompt(req.prompt)
    stream = bool(req.stream)
    check_stream_options(stream, req.stream_options is not None)
    check_suffix(req.suffix)
    beam = bool(req.use_beam_search)
    n = req.n or 1
    best_of = req.best_of if req.best_of is not None else n
    temperature = pick(req.temperature, None if beam else defaults.temperature, 0.0 if beam else 1.0)
    top_p = pick(req.top_p, None if beam else defaults.top_p, 1.0)
    top_k = pick(req.top_k, None if beam else defaults.top_k, -1)
    check_top_k(top_k)
    check_best_of(n, best_of, stream)
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
    max_tokens = req.max_tokens if req.max_tokens is not None else defaults.max_tokens
    # Best-of ranks candidates by cumulative logprob, which the engine computes only with logprobs on.
    engine_logprobs = req.logprobs if req.logprobs is not None else (0 if best_of > n else None)
    sampling = protocol.SamplingParams(
        n=1 if beam else best_of,
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        clamp_max_tokens=req.max_tokens is None,
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
        prompt_logprobs=req.logprobs if req.echo and req.logprobs is not None else None,
    )
    beam_search = None
    if kind is SamplingType.BEAM:
        beam_search = protocol.BeamSearch(
            width=best_of,
            length_penalty=req.length_penalty if req.length_penalty is not None else 1.0,
            early_stopping=req.early_stopping if req.early_stopping is not None else False,
        )
    return CompletionPlan(
        prompts=prompts,
        sampling=sampling,
        beam=beam_search,
        n=n,
        echo=bool(req.echo),
        logprobs=req.logprobs,
        stream=stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )


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
    index: int, cand: Candidate, plan: CompletionPlan, prompt_text: str, prompt_logprobs: list[protocol.TokenLogprob] | None
) -> CompletionChoice:
    """One choice of a non-streamed response, with the prompt in front when echo is on."""
    text = (prompt_text if plan.echo else "") + cand.text
    logprobs = None
    if plan.logprobs is not None:
        entries = list(prompt_logprobs or []) if plan.echo else []
        entries += cand.logprobs or []
        logprobs = completion_logprobs(entries, plan.logprobs)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(cand.finish_reason))  # type: ignore[arg-type]
