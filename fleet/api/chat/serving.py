"""/v1/chat/completions: a request planned, and its chat.completion answer, whole or as a stream."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator

import msgspec

from fleet.api import answers
from fleet.api.answers import FrameSource, finish_reason
from fleet.api.chat.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    TopLogprob,
)
from fleet.api.planning import NO_LIMITS, Plan, for_request, plan
from fleet.api.protocol import Usage
from fleet.api.rules import chat_top_logprobs, check_tools, structured_output, text_messages
from fleet.config.model import Limits, SamplingDefaults
from fleet.wire import protocol

_json = msgspec.json.Encoder()


def plan_chat(req: ChatCompletionRequest, defaults: SamplingDefaults, limits: Limits = NO_LIMITS) -> Plan:
    """Apply defaults and every rule to a chat request."""
    check_tools(req.tools, req.tool_choice)
    messages = text_messages(req.messages)
    schema, json_object = structured_output(req.response_format)
    logprobs = chat_top_logprobs(req.logprobs, req.top_logprobs)
    d = for_request(req, defaults, "chat")
    chat = protocol.Chat(
        messages=messages,
        add_generation_prompt=d.pick("add_generation_prompt", req.add_generation_prompt),
        continue_final_message=d.pick("continue_final_message", req.continue_final_message),
    )
    planned = plan(
        req, d, [chat],
        limits=limits,
        size=sum(len(m.content) for m in messages),
        prompt_param="messages",
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        logprobs=logprobs,
    )
    if schema is not None or json_object:
        sampling = msgspec.structs.replace(planned.sampling, json_schema=schema, json_object=json_object)
        planned = dataclasses.replace(planned, sampling=sampling)
    return planned


async def complete(source: FrameSource, plan: Plan, model: str) -> bytes:
    """A whole chat.completion as JSON bytes."""
    request_id = answers.new_id("chatcmpl")
    results = await answers.collect(source, plan, request_id)
    choices = [
        ChatChoice(
            index=p * plan.n + i,
            message=ChatMessageOut(cand.text),
            logprobs=chat_logprobs(cand.logprobs or [], plan.logprobs) if plan.logprobs is not None else None,
            finish_reason=finish_reason(cand.finish_reason),
        )
        for p, result in enumerate(results)
        for i, cand in enumerate(result.chosen(plan))
    ]
    response = ChatCompletionResponse(request_id, answers.created(), model, choices, answers.usage(results, plan))
    return _json.encode(response)


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


class ChatShaper:
    """chat.completion.chunk events: a role delta opens each choice, content deltas follow."""

    def __init__(self, plan: Plan, model: str, request_id: str) -> None:
        self.plan, self.model, self.id = plan, model, request_id
        self.created = answers.created()
        self.opened: set[int] = set()

    def _event(self, choice: ChatChunkChoice, usage: Usage | None) -> bytes:
        return answers.sse(_json.encode(ChatCompletionChunk(self.id, self.created, self.model, [choice], usage)))

    def delta(
        self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int, usage: Usage | None
    ) -> bytes:
        out = b""
        if index not in self.opened:
            self.opened.add(index)
            opening = None if usage is None else Usage(usage.prompt_tokens, 0, usage.prompt_tokens)
            out = self._event(ChatChunkChoice(index, ChatDelta(role="assistant", content=""), None, None), opening)
        logprobs = None
        if self.plan.logprobs is not None:
            logprobs = chat_logprobs(frame.logprobs or [], self.plan.logprobs)
        reason = finish_reason(frame.finish_reason)
        return out + self._event(ChatChunkChoice(index, ChatDelta(content=frame.text), logprobs, reason), usage)

    def usage(self, usage: Usage) -> bytes:
        return answers.sse(_json.encode(ChatCompletionChunk(self.id, self.created, self.model, [], usage)))


async def stream(source: FrameSource, plan: Plan, model: str) -> AsyncGenerator[bytes, None]:
    """A streamed chat.completion (SSE bytes); raises before streaming if the engine refuses."""
    request_id = answers.new_id("chatcmpl")
    return await answers.open_stream(source, plan, ChatShaper(plan, model, request_id), request_id)
