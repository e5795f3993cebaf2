"""/v1/responses: a request resolved (the stored conversation it continues), planned as a chat
(items.py; the chat endpoint's own planning: tools, structured outputs, reasoning), and its
Response answered whole or as typed events; stored, unless `store` is false.

Where the two APIs name things apart, an error names the Responses field (`text.format`, not
`response_format`; `tools[0].parameters`, not `tools[0].function.parameters`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import msgspec

from fleet.api import answers
from fleet.api.answers import Candidate, FrameSource, PromptResult
from fleet.api.chat.protocol import ChatCompletionRequest, ChatTokenLogprob
from fleet.api.chat.serving import chat_logprobs, plan_chat
from fleet.api.endpoint import Caller
from fleet.api.planning import Plan
from fleet.api.responses.items import chat_messages, chat_tools, check_calls, input_items, item_id
from fleet.api.responses.protocol import (
    OUTPUT_LOGPROBS,
    ArgumentsDelta,
    ArgumentsDone,
    ContentPartAdded,
    ContentPartDone,
    ErrorEvent,
    Event,
    FunctionCall,
    IncompleteDetails,
    InputTokensDetails,
    ItemAdded,
    ItemDone,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningDelta,
    ReasoningDone,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseCompleted,
    ResponseCreated,
    ResponseIncomplete,
    ResponseInProgress,
    ResponsesRequest,
    ResponseUsage,
    TextDelta,
    TextDone,
)
from fleet.api.responses.store import Stored
from fleet.config.model import ModelConfig
from fleet.errors import FleetError, InvalidRequest, ResponseNotFound
from fleet.wire import protocol

_json = msgspec.json.Encoder()
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
        e.param = responses_field(e.param)
        raise


# --- the Response ---------------------------------------------------------------------------


def response_of(plan: ResponsesPlan, response_id: str, created: int, output: list[OutputItem], status: str,
                usage: ResponseUsage | None = None) -> Response:
    req = plan.request
    return Response(
        id=response_id, created_at=created, model=req.model, status=status,  # type: ignore[arg-type]
        output=output, usage=usage, parallel_tool_calls=req.parallel_tool_calls is not False,
        tool_choice=req.tool_choice or ("auto" if req.tools else "none"), tools=req.tools or [],
        incomplete_details=IncompleteDetails("max_output_tokens") if status == "incomplete" else None,
        instructions=req.instructions, metadata=req.metadata or {}, temperature=req.temperature, top_p=req.top_p,
        max_output_tokens=req.max_output_tokens, previous_response_id=req.previous_response_id,
        reasoning=req.reasoning, text=req.text, user=req.user, store=req.store is not False,
        top_logprobs=req.top_logprobs, truncation=req.truncation or "disabled",
    )


def usage_of(result: PromptResult) -> ResponseUsage:
    return ResponseUsage(result.prompt_tokens, InputTokensDetails(result.cached_tokens, 0), result.completion_tokens,
                         OutputTokensDetails(result.reasoning_tokens), result.prompt_tokens + result.completion_tokens)


def status_of(reason: str | None) -> str:
    """A response cut at max_output_tokens is "incomplete"; anything else "completed"."""
    return "incomplete" if reason == "length" else "completed"


def output_of(cand: Candidate, plan: ResponsesPlan) -> list[OutputItem]:
    """A whole answer's output items: its reasoning, its message (unless it only called tools),
    its function calls."""
    status = "incomplete" if cand.finish_reason == "length" else "completed"
    out: list[OutputItem] = []
    if cand.reasoning and plan.chat.show_reasoning:
        out.append(ReasoningItem(id=item_id("rs"), content=[ReasoningText(text=cand.reasoning)], status=status))  # type: ignore[arg-type]
    if cand.text or not cand.calls:
        text = OutputText(text=cand.text, logprobs=token_logprobs(plan, cand.logprobs))
        out.append(OutputMessage(id=item_id("msg"), content=[text], status=status))  # type: ignore[arg-type]
    out += [FunctionCall(id=item_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments)
            for _, c in sorted(cand.calls.items())]
    return out


def token_logprobs(plan: ResponsesPlan, entries: list[protocol.TokenLogprob] | None) -> list[ChatTokenLogprob] | None:
    """The output text's logprobs, when asked for: each token the model wrote for this answer (as
    vLLM's /v1/responses gives them, its reasoning's included), with `top_logprobs` alternatives."""
    top = plan.chat.logprobs
    return chat_logprobs(entries or [], top).content if top is not None else None


def without_logprobs(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the conversation keeps it: its text parts without their logprobs, which
    a continued conversation never reads (the stored Response keeps them)."""
    for part in item.get("content") or ():
        part.pop("logprobs", None)
    return item


async def keep(plan: ResponsesPlan, response: Response) -> None:
    """Store the response (unless `store` is false, or the gateway keeps none), with the whole
    conversation up to its output, for previous_response_id."""
    store = plan.caller.responses
    if plan.request.store is False or store is None:
        return
    outputs = [without_logprobs(msgspec.to_builtins(item)) for item in response.output]
    await store.put(Stored(response.id, plan.caller.key, response.created_at, _json.encode(response).decode(),
                           plan.items, [*plan.transcript, *outputs]))


async def complete(source: FrameSource, plan: ResponsesPlan, model: str) -> bytes:
    """A whole Response as JSON bytes (stored first, so that it can be continued at once)."""
    response_id = item_id("resp")
    created = answers.created()
    with named_as_responses():
        [result] = await answers.collect(source, plan.chat, response_id)
    cand = result.chosen(plan.chat)[0]
    response = response_of(plan, response_id, created, output_of(cand, plan), status_of(cand.finish_reason),
                           usage_of(result))
    await keep(plan, response)
    return _json.encode(response)


# --- the stream ----------------------------------------------------------------------------------


def event(e: Event) -> bytes:
    """One typed event: `event: <type>` and its JSON, as OpenAI writes them."""
    body = _json.encode(e)
    kind = type(e).__struct_config__.tag
    return b"event: " + str(kind).encode() + b"\ndata: " + body + b"\n\n"


@dataclass
class _Open:
    """The output item being written: its index among the output items, and its text so far."""

    index: int
    item: OutputItem
    text: str = ""
    logprobs: list[ChatTokenLogprob] | None = None  # a message's, when asked for


@dataclass
class ResponsesShaper:
    """A Response as typed events: created and in_progress first, then each output item as it
    comes (added, its content or arguments in deltas, done; one item open at a time, in the order
    the answer makes them), then completed (or incomplete) with the whole Response."""

    plan: ResponsesPlan
    response_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    seq: int = 0
    started: bool = False
    output: list[OutputItem] = field(default_factory=list)
    open: _Open | None = None
    calls: dict[int, _Open] = field(default_factory=dict)  # a call's index -> its item
    finish: str | None = None

    def _e(self, make: Any, **fields: Any) -> bytes:
        e = make(sequence_number=self.seq, **fields)
        self.seq += 1
        return event(e)

    def _start(self) -> bytes:
        if self.started:
            return b""
        self.started = True
        shown = response_of(self.plan, self.response_id, self.created, [], "in_progress")
        return self._e(ResponseCreated, response=shown) + self._e(ResponseInProgress, response=shown)

    def _close(self) -> bytes:
        """The open item's done events."""
        o, self.open = self.open, None
        if o is None:
            return b""
        item = o.item
        if isinstance(item, OutputMessage):
            part = OutputText(text=o.text, logprobs=o.logprobs)
            item.content = [part]
            out = (self._e(TextDone, item_id=item.id, output_index=o.index, content_index=0, text=o.text,
                           logprobs=o.logprobs or [])
                   + self._e(ContentPartDone, item_id=item.id, output_index=o.index, content_index=0, part=part))
        elif isinstance(item, ReasoningItem):
            reasoning = ReasoningText(text=o.text)
            item.content = [reasoning]
            out = (self._e(ReasoningDone, item_id=item.id, output_index=o.index, content_index=0, text=o.text)
                   + self._e(ContentPartDone, item_id=item.id, output_index=o.index, content_index=0, part=reasoning))
        else:
            item.arguments = o.text
            out = self._e(ArgumentsDone, item_id=item.id, output_index=o.index, arguments=o.text, name=item.name)
        item.status = "completed"
        return out + self._e(ItemDone, output_index=o.index, item=item)

    def _open(self, item: OutputItem) -> tuple[_Open, bytes]:
        out = self._close()
        o = self.open = _Open(len(self.output), item)
        if isinstance(item, OutputMessage) and self.plan.chat.logprobs is not None:
            o.logprobs = []
        self.output.append(item)
        out += self._e(ItemAdded, output_index=o.index, item=item)
        if isinstance(item, OutputMessage):
            out += self._e(ContentPartAdded, item_id=item.id, output_index=o.index, content_index=0, part=OutputText(text=""))
        elif isinstance(item, ReasoningItem):
            out += self._e(ContentPartAdded, item_id=item.id, output_index=o.index, content_index=0,
                           part=ReasoningText(text=""))
        return o, out

    def delta(self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int,
              usage: Any) -> bytes:
        out = self._start()
        if frame.reasoning and self.plan.chat.show_reasoning:
            o = self.open
            if o is None or not isinstance(o.item, ReasoningItem):
                o, opened = self._open(ReasoningItem(id=item_id("rs"), status="in_progress"))
                out += opened
            o.text += frame.reasoning
            out += self._e(ReasoningDelta, item_id=o.item.id, output_index=o.index, content_index=0, delta=frame.reasoning)
        if frame.text:
            o = self.open
            if o is None or not isinstance(o.item, OutputMessage):
                o, opened = self._open(OutputMessage(id=item_id("msg"), content=[], status="in_progress"))
                out += opened
            o.text += frame.text
            logprobs = token_logprobs(self.plan, frame.logprobs)
            if o.logprobs is not None and logprobs:
                o.logprobs += logprobs
            out += self._e(TextDelta, item_id=o.item.id, output_index=o.index, content_index=0, delta=frame.text,
                           logprobs=logprobs or [])
        for piece in frame.tool_calls or ():
            o = self.calls.get(piece.index)
            if o is None:
                call = FunctionCall(id=item_id("fc"), call_id=piece.id or item_id("call"),
                                    name=piece.name or "", arguments="", status="in_progress")
                o, opened = self._open(call)
                self.calls[piece.index] = o
                out += opened
            if piece.arguments:
                o.text += piece.arguments
                out += self._e(ArgumentsDelta, item_id=o.item.id, output_index=o.index, delta=piece.arguments)
        if frame.finish_reason is not None:
            self.finish = frame.finish_reason
        return out

    async def end(self, results: list[PromptResult], failed: FleetError | None) -> bytes:
        out = self._start()
        if failed is not None:
            return out + self._e(ErrorEvent, message=failed.message, code=failed.code, param=responses_field(failed.param))
        if not self.output:  # an empty answer is still a message
            _, opened = self._open(OutputMessage(id=item_id("msg"), content=[], status="in_progress"))
            out += opened
        out += self._close()
        status = status_of(self.finish)
        response = response_of(self.plan, self.response_id, self.created, self.output, status, usage_of(results[0]))
        await keep(self.plan, response)
        return out + self._e(ResponseIncomplete if status == "incomplete" else ResponseCompleted, response=response)


async def stream(source: FrameSource, plan: ResponsesPlan, model: str) -> Any:
    """A streamed Response (typed SSE events); raises before streaming if the engine refuses."""
    response_id = item_id("resp")
    with named_as_responses():
        return await answers.open_stream(source, plan.chat, ResponsesShaper(plan, response_id), response_id)


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
