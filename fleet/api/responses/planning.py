"""/v1/responses, the request's side: a request resolved (the stored conversation it continues,
read with the caller's key), checked, and planned as a chat (items.py; the chat endpoint's own
planning: tools, structured outputs, reasoning), every error named by the Responses API's own
fields (`text.format`, not `response_format`; `tools[0].parameters`, not
`tools[0].function.parameters`; an engine's refusal too: `named_as_responses`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import msgspec

from fleet.api.chat.protocol import ChatCompletionRequest
from fleet.api.chat.serving import plan_chat
from fleet.api.endpoint import Caller
from fleet.api.planning import Plan
from fleet.api.responses.items import chat_messages, chat_tools, check_calls, input_items
from fleet.api.responses.protocol import OUTPUT_LOGPROBS, ResponsesRequest
from fleet.api.responses.store import Stored
from fleet.config.model import ModelConfig
from fleet.errors import FleetError, InvalidRequest, ResponseNotFound
from fleet.wire import protocol

# chat's names for a field -> the Responses API's
_FIELDS = [(re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1]."),
           (re.compile(r"^response_format\.json_schema\."), "text.format."), (re.compile(r"^response_format"), "text.format"),
           (re.compile(r"^max_(completion_)?tokens$"), "max_output_tokens"), (re.compile(r"^messages.*"), "input")]


@dataclass(frozen=True)
class Resolved:
    """A request and what it refers to: the stored response it continues, and who asks."""

    request: ResponsesRequest
    caller: Caller
    previous: Stored | None = None


async def resolve(req: ResponsesRequest, caller: Caller) -> Resolved:
    """Read the response `previous_response_id` names (a 404 naming the field when this key has none)."""
    if req.previous_response_id is None:
        return Resolved(req, caller)
    previous = await caller.responses.get(req.previous_response_id, caller.key) if caller.responses else None
    if previous is None:
        raise ResponseNotFound(req.previous_response_id, param="previous_response_id")
    return Resolved(req, caller, previous)


@dataclass(frozen=True)
class ResponsesPlan:
    """A Responses request as a chat plan, and what its Response and its stored record need."""

    chat: Plan
    request: ResponsesRequest
    items: list[dict[str, Any]]  # this request's input items
    transcript: list[dict[str, Any]]  # the conversation so far, this input included
    caller: Caller

    @property
    def stream(self) -> bool:
        return self.chat.stream


def plan_responses(resolved: Resolved, model: ModelConfig) -> ResponsesPlan:
    """Check the request and plan it as a chat (errors named by the Responses API's fields)."""
    req = resolved.request
    check_unsupported(req)
    earlier = resolved.previous.transcript if resolved.previous else []
    items = input_items(req.input)
    check_calls(earlier, items)
    transcript = [*earlier, *items]
    if req.reasoning is not None and (req.reasoning.effort or req.reasoning.summary) and model.reasoning_parser is None:
        raise InvalidRequest(f"model {model.name!r} has no reasoning parser: it answers without reasoning apart "
                             "(set reasoning_parser in its [[models]] table)", param="reasoning")
    chat: dict[str, Any] = {"model": req.model, "messages": chat_messages(req.instructions, transcript), "stream": req.stream,
            "tools": chat_tools(req.tools), "parallel_tool_calls": req.parallel_tool_calls, "user": req.user,
            "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature, "top_p": req.top_p,
            "seed": req.seed}
    if wants_logprobs(req):
        chat["logprobs"], chat["top_logprobs"] = True, req.top_logprobs
    if isinstance(req.tool_choice, str):
        chat["tool_choice"] = req.tool_choice
    elif req.tool_choice is not None:
        chat["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema, "description": fmt.description, "strict": fmt.strict}}
    elif fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    try:
        chat_request = msgspec.convert({k: v for k, v in chat.items() if v is not None}, ChatCompletionRequest)
        planned = plan_chat(chat_request, model.defaults, model.limits, tool_parser=model.tool_parser,
                            reasoning=model.reasoning_parser is not None, model=model.name)
    except InvalidRequest as e:
        raise InvalidRequest(e.message, param=responses_field(e.param), code=e.code) from None
    except msgspec.ValidationError as e:  # a value the Responses schema let through that chat's refuses
        raise InvalidRequest(f"invalid request: {e}") from None
    if req.truncation == "auto":  # the engine leaves out the oldest turns where the context is too short
        planned = replace(planned, prompts=[msgspec.structs.replace(p, truncate=True) if isinstance(p, protocol.Chat)
                                            else p for p in planned.prompts])
    return ResponsesPlan(planned, req, items, transcript, resolved.caller)


def check_unsupported(req: ResponsesRequest) -> None:
    """Fields of OpenAI's that fleet cannot honour and that would change the answer unseen if
    ignored: each a 400 naming it, saying what to send instead."""
    if req.background:
        raise InvalidRequest("background responses are not supported: fleet answers within the request "
                             "(stream: true shows it as it comes)", param="background")
    if req.conversation is not None:
        raise InvalidRequest("conversations are not supported: continue a stored response with previous_response_id",
                             param="conversation")
    if req.prompt is not None:
        raise InvalidRequest("stored prompt templates are not supported: send instructions and input", param="prompt")


def wants_logprobs(req: ResponsesRequest) -> bool:
    """The output text carries its tokens' logprobs when `include` names them or `top_logprobs` is set."""
    return OUTPUT_LOGPROBS in (req.include or ()) or req.top_logprobs is not None


def responses_field(param: str | None) -> str | None:
    """A field as the Responses API names it (a chat error's `param`)."""
    if param is None:
        return None
    for pattern, name in _FIELDS:
        if pattern.match(param):
            return pattern.sub(name, param)
    return param


@contextmanager
def named_as_responses() -> Iterator[None]:
    """An error of the engine's (a prompt longer than the context, a max_tokens too large) names
    the Responses API's field (`input`, `max_output_tokens`)."""
    try:
        yield
    except FleetError as e:
        named = responses_field(e.param)
        if e.param and named != e.param and named == "max_output_tokens":  # "max_tokens can be at most 507"
            e.message = re.sub(rf"\b{re.escape(e.param)}\b", named, e.message)
            e.args = (e.message,)
        e.param = named
        raise


def last_input_text(resolved: Resolved) -> str:
    """What the status page shows of a request: its last input message's text."""
    given = resolved.request.input
    if isinstance(given, str):
        return given
    for item in reversed(given):
        content = item.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""
