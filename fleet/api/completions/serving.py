"""/v1/completions: a request planned, and its text_completion answer, whole or as a stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import msgspec

from fleet.api import answers
from fleet.api.answers import Candidate, FrameSource, finish_reason
from fleet.api.completions.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from fleet.api.planning import NO_LIMITS, Plan, Prompt, for_request, plan
from fleet.api.protocol import Usage
from fleet.api.rules import check_suffix, prompt_list
from fleet.config.model import Limits, SamplingDefaults
from fleet.errors import FleetError
from fleet.wire import protocol

_json = msgspec.json.Encoder()


def plan_completion(req: CompletionRequest, defaults: SamplingDefaults, limits: Limits = NO_LIMITS) -> Plan:
    """Apply defaults and every rule to a completions request."""
    prompts: list[Prompt] = list(prompt_list(req.prompt))
    check_suffix(req.suffix)
    d = for_request(req, defaults, "completions")
    echo: bool = d.pick("echo", req.echo)
    return plan(
        req, d, prompts,
        limits=limits,
        size=sum(len(p) for p in prompts if not isinstance(p, protocol.Chat)),
        max_tokens=req.max_tokens,
        logprobs=req.logprobs,
        prompt_logprobs=req.logprobs if echo else None,
        echo=echo,
    )


async def complete(source: FrameSource, plan: Plan, model: str) -> bytes:
    """A whole, non-streamed text_completion as JSON bytes."""
    request_id = answers.new_id("cmpl")
    results = await answers.collect(source, plan, request_id)
    choices: list[CompletionChoice] = []
    for p, (prompt, result) in enumerate(zip(plan.prompts, results, strict=True)):
        prompt_text = prompt_text_of(prompt, result.prompt)
        prompt_logprobs = result.prompt.logprobs if result.prompt else None
        for i, cand in enumerate(result.chosen(plan)):
            choices.append(completion_choice(p * plan.n + i, cand, plan, prompt_text, prompt_logprobs))
    response = CompletionResponse(request_id, answers.created(), model, choices, answers.usage(results, plan))
    return _json.encode(response)


def completion_choice(
    index: int, cand: Candidate, plan: Plan, prompt_text: str, prompt_logprobs: list[protocol.TokenLogprob] | None
) -> CompletionChoice:
    """One choice of a non-streamed answer, with the prompt in front when echo is on."""
    text = (prompt_text if plan.echo else "") + cand.text
    logprobs = None
    if plan.logprobs is not None:
        entries = list(prompt_logprobs or []) if plan.echo else []
        entries += cand.logprobs or []
        logprobs = completion_logprobs(entries, plan.logprobs)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason(cand.finish_reason))


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


def prompt_text_of(prompt: object, frame: protocol.Prompt | None) -> str:
    """The prompt's text for echo: as sent, or as the engine decoded token ids."""
    return prompt if isinstance(prompt, str) else ((frame.text if frame else None) or "")


@dataclass
class _ChoiceState:
    started: bool = False
    offset: int = 0


class CompletionShaper:
    """text_completion chunks; echo puts the prompt (and its logprobs) in each choice's first chunk."""

    def __init__(self, plan: Plan, model: str, request_id: str) -> None:
        self.plan, self.model, self.id = plan, model, request_id
        self.created = answers.created()
        self.choices: dict[int, _ChoiceState] = {}

    def delta(
        self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int, usage: Usage | None
    ) -> bytes:
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _ChoiceState()
        text, entries = frame.text, frame.logprobs or []
        if not state.started:
            state.started = True
            if self.plan.echo:
                text = prompt_text_of(self.plan.prompts[prompt_index], prompt) + text
                entries = list((prompt.logprobs if prompt else None) or []) + entries
        logprobs: CompletionLogprobs | None = None
        if self.plan.logprobs is not None:
            logprobs = completion_logprobs(entries, self.plan.logprobs, state.offset)
            if logprobs.tokens:
                state.offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        choice = CompletionChoice(index, text, logprobs, finish_reason(frame.finish_reason))
        return answers.sse(_json.encode(CompletionChunk(self.id, self.created, self.model, [choice], usage)))

    def usage(self, usage: Usage) -> bytes:
        return answers.sse(_json.encode(CompletionChunk(self.id, self.created, self.model, [], usage)))

    async def end(self, results: list[answers.PromptResult], failed: FleetError | None) -> bytes:
        return answers.chunks_end(self.usage, self.plan, results, failed)


async def stream(source: FrameSource, plan: Plan, model: str) -> AsyncGenerator[bytes, None]:
    """A streamed text_completion (SSE bytes); raises before streaming if the engine refuses."""
    request_id = answers.new_id("cmpl")
    return await answers.open_stream(source, plan, CompletionShaper(plan, model, request_id), request_id)
