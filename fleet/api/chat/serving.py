"""/v1/chat/completions: a request planned, and its chat.completion answer, whole or as a stream."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator

import msgspec

from fleet.api import answers
from fleet.api.answers import Candidate, FrameSource, finish_reason
from fleet.api.chat.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatFinishReason,
    ChatLogprobs,
    ChatMessageOut,
    ChatTokenLogprob,
    FunctionCall,
    FunctionCallChunk,
    ToolCall,
    ToolCallChunk,
    TopLogprob,
)
from fleet.api.chat.tools import tools_of
from fleet.api.planning import NO_LIMITS, Plan, for_request, plan
from fleet.api.protocol import Usage
from fleet.api.rules import chat_messages, chat_top_logprobs, response_format_structure
from fleet.config.model import Limits, SamplingDefaults
from fleet.errors import FleetError, InvalidRequest
from fleet.wire import protocol

_json = msgspec.json.Encoder()


def plan_chat(req: ChatCompletionRequest, defaults: SamplingDefaults, limits: Limits = NO_LIMITS, *,
              tool_parser: str | None = None, reasoning: bool = False, model: str = "") -> Plan:
    """Apply defaults and every rule to a chat request: its messages, tools (tools.py), structured
    output; `tool_parser` and `reasoning` say what the model can read apart (its fleet.toml)."""
    check_unsupported(req)
    tools = tools_of(req.tools, req.tool_choice, req.parallel_tool_calls, req.response_format, tool_parser, model)
    messages = chat_messages(req.messages)
    structure = response_format_structure(req.response_format)
    if tools.schema is not None:
        structure = protocol.Structured(json=tools.schema, param=tools.schema_param)
    logprobs = chat_top_logprobs(req.logprobs, req.top_logprobs)
    d = for_request(req, defaults, "chat")
    chat = protocol.Chat(
        messages=messages,
        add_generation_prompt=d.pick("add_generation_prompt", req.add_generation_prompt),
        continue_final_message=d.pick("continue_final_message", req.continue_final_message),
        tools=tools.rendered,
    )
    planned = plan(
        req, d, [chat],
        limits=limits,
        size=sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls or ()) for m in messages),
        prompt_param="messages",
        max_tokens=req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens,
        logprobs=logprobs,
    )
    if planned.beam is not None and tools.use is not None:
        raise InvalidRequest("tools cannot be used with use_beam_search", param="tools")
    if structure is not None:
        if planned.sampling.structured is not None:
            raise InvalidRequest("structured_outputs cannot be used with response_format or a forced tool call",
                                 param="structured_outputs")
        planned = dataclasses.replace(planned, sampling=msgspec.structs.replace(planned.sampling, structured=structure))
    if tools.use is not None or reasoning:
        planned = dataclasses.replace(planned, tools=tools.use, reasoning=reasoning,
                                      show_reasoning=req.include_reasoning is not False)
    return planned


async def complete(source: FrameSource, plan: Plan, model: str) -> bytes:
    """A whole chat.completion as JSON bytes."""
    request_id = answers.new_id("chatcmpl")
    results = await answers.collect(source, plan, request_id)
    choices = [
        ChatChoice(
            index=p * plan.n + i,
            message=message(cand, plan),
            logprobs=chat_logprobs(cand.logprobs or [], plan.logprobs) if plan.logprobs is not None else None,
            finish_reason=chat_finish_reason(cand.finish_reason, bool(cand.calls), plan),
        )
        for p, result in enumerate(results)
        for i, cand in enumerate(result.chosen(plan))
    ]
    response = ChatCompletionResponse(request_id, answers.created(), model, choices, answers.usage(results, plan))
    return _json.encode(response)


def message(cand: Candidate, plan: Plan) -> ChatMessageOut:
    """A whole answer's message: its content (null when it only called tools), its tool calls, its
    reasoning (a model with a reasoning parser, unless include_reasoning is false)."""
    calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
             for _, c in sorted(cand.calls.items())] or None
    content = cand.text if cand.text or not calls else None
    reasoning = cand.reasoning if plan.reasoning and plan.show_reasoning else None
    return ChatMessageOut(content, "assistant", tool_calls=calls, reasoning_content=reasoning)


def chat_finish_reason(reason: str | None, called: bool, plan: Plan) -> ChatFinishReason | None:
    """"tool_calls" when the model called a tool under tool_choice "auto" or "required" (a named
    function ends with "stop", as OpenAI's does); else OpenAI's stop or length."""
    finished = finish_reason(reason)
    if finished == "stop" and called and plan.tools is not None and plan.tools.mode != "named":
        return "tool_calls"
    return finished


def check_unsupported(req: ChatCompletionRequest) -> None:
    """Fields of OpenAI's that fleet cannot honour and that would change the answer unseen if
    ignored: each a 400 naming it, saying what to send instead."""
    for legacy in ("functions", "function_call"):
        if getattr(req, legacy) is not None:
            raise InvalidRequest(f"{legacy} is OpenAI's deprecated form of tools: send tools "
                                 '([{"type": "function", "function": {...}}]) and tool_choice instead', param=legacy)
    if req.audio is not None or any(m != "text" for m in req.modalities or ()):
        raise InvalidRequest('only text is answered: modalities is ["text"] and audio is not supported',
                             param="audio" if req.audio is not None else "modalities")
    if req.web_search_options is not None:
        raise InvalidRequest("web search is not supported: fleet runs function tools only", param="web_search_options")


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
    """chat.completion.chunk events: a role delta opens each choice, content deltas follow (with
    the reasoning and tool-call pieces read apart, when there are)."""

    def __init__(self, plan: Plan, model: str, request_id: str) -> None:
        self.plan, self.model, self.id = plan, model, request_id
        self.created = answers.created()
        self.opened: set[int] = set()
        self.called: set[int] = set()  # choices that called a tool

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
        calls = None
        if frame.tool_calls:
            self.called.add(index)
            calls = [ToolCallChunk(c.index, c.id, "function" if c.id else None,
                                   FunctionCallChunk(c.name, c.arguments if c.arguments or c.name else None))
                     for c in frame.tool_calls]
        reasoning = frame.reasoning or None if self.plan.show_reasoning else None
        content = frame.text if frame.text or not (calls or reasoning) else None
        reason = chat_finish_reason(frame.finish_reason, index in self.called, self.plan)
        delta = ChatDelta(content=content, reasoning_content=reasoning, tool_calls=calls)
        return out + self._event(ChatChunkChoice(index, delta, logprobs, reason), usage)

    def usage(self, usage: Usage) -> bytes:
        return answers.sse(_json.encode(ChatCompletionChunk(self.id, self.created, self.model, [], usage)))

    async def end(self, results: list[answers.PromptResult], failed: FleetError | None) -> bytes:
        return answers.chunks_end(self.usage, self.plan, results, failed)


async def stream(source: FrameSource, plan: Plan, model: str) -> AsyncGenerator[bytes, None]:
    """A streamed chat.completion (SSE bytes); raises before streaming if the engine refuses."""
    request_id = answers.new_id("chatcmpl")
    return await answers.open_stream(source, plan, ChatShaper(plan, model, request_id), request_id)
