"""/v1/completions: text_completion objects, whole or as a stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import msgspec

from fleet import protocol, serving
from fleet.routing import Backend
from fleet.schemas import CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionResponse, Usage
from fleet.translate import Plan, completion_choice, completion_logprobs, finish_reason

_json = msgspec.json.Encoder()


async def complete(backend: Backend, plan: Plan, model: str) -> bytes:
    """A whole, non-streamed text_completion as JSON bytes."""
    request_id = serving.new_id("cmpl")
    results = await serving.collect(backend, plan, request_id)
    choices: list[CompletionChoice] = []
    for p, (prompt, result) in enumerate(zip(plan.prompts, results)):
        prompt_text = prompt_text_of(prompt, result.prompt)
        prompt_logprobs = result.prompt.logprobs if result.prompt else None
        for i, cand in enumerate(result.chosen(plan)):
            choices.append(completion_choice(p * plan.n + i, cand, plan, prompt_text, prompt_logprobs))
    response = CompletionResponse(request_id, serving.created(), model, choices, serving.usage(results, plan))
    return _json.encode(response)


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
        self.created = serving.created()
        self.choices: dict[int, _ChoiceState] = {}

    def delta(self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int) -> bytes:
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
        choice = CompletionChoice(index, text, logprobs, finish_reason(frame.finish_reason))  # type: ignore[arg-type]
        return serving.sse(_json.encode(CompletionChunk(self.id, self.created, self.model, [choice])))

    def usage(self, usage: Usage) -> bytes:
        return serving.sse(_json.encode(CompletionChunk(self.id, self.created, self.model, [], usage)))


async def stream(backend: Backend, plan: Plan, model: str) -> AsyncGenerator[bytes, None]:
    """A streamed text_completion (SSE bytes); raises before streaming if the engine refuses."""
    request_id = serving.new_id("cmpl")
    return await serving.open_stream(backend, plan, CompletionShaper(plan, model, request_id), request_id)
