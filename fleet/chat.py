"""/v1/chat/completions: chat.completion objects, whole or as a stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import msgspec

from fleet import protocol, serving
from fleet.routing import Backend
from fleet.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    Usage,
)
from fleet.translate import Plan, chat_logprobs, finish_reason

_json = msgspec.json.Encoder()


async def complete(backend: Backend, plan: Plan, model: str) -> bytes:
    """A whole chat.completion as JSON bytes."""
    request_id = serving.new_id("chatcmpl")
    results = await serving.collect(backend, plan, request_id)
    choices = [
        ChatChoice(
            index=p * plan.n + i,
            message=ChatMessageOut(cand.text),
            logprobs=chat_logprobs(cand.logprobs or [], plan.logprobs) if plan.logprobs is not None else None,
            finish_reason=finish_reason(cand.finish_reason),  # type: ignore[arg-type]
        )
        for p, result in enumerate(results)
        for i, cand in enumerate(result.chosen(plan))
    ]
    response = ChatCompletionResponse(request_id, serving.created(), model, choices, serving.usage(results, plan))
    return _json.encode(response)


class ChatShaper:
    """chat.completion.chunk events: a role delta opens each choice, content deltas follow."""

    def __init__(self, plan: Plan, model: str, request_id: str) -> None:
        self.plan, self.model, self.id = plan, model, request_id
        self.created = serving.created()
        self.opened: set[int] = set()

    def _event(self, choice: ChatChunkChoice) -> bytes:
        return serving.sse(_json.encode(ChatCompletionChunk(self.id, self.created, self.model, [choice])))

    def delta(self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int) -> bytes:
        out = b""
        if index not in self.opened:
            self.opened.add(index)
            out = self._event(ChatChunkChoice(index, ChatDelta(role="assistant", content=""), None, None))
        logprobs = None
        if self.plan.logprobs is not None:
            logprobs = chat_logprobs(frame.logprobs or [], self.plan.logprobs)
        reason = finish_reason(frame.finish_reason)
        return out + self._event(ChatChunkChoice(index, ChatDelta(content=frame.text), logprobs, reason))  # type: ignore[arg-type]

    def usage(self, usage: Usage) -> bytes:
        return serving.sse(_json.encode(ChatCompletionChunk(self.id, self.created, self.model, [], usage)))


async def stream(backend: Backend, plan: Plan, model: str) -> AsyncGenerator[bytes, None]:
    """A streamed chat.completion (SSE bytes); raises before streaming if the engine refuses."""
    request_id = serving.new_id("chatcmpl")
    return await serving.open_stream(backend, plan, ChatShaper(plan, model, request_id), request_id)
