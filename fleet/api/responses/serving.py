"""/v1/responses, the answer's side: a planned request's Response (planning.py makes the plan)
answered whole or as typed events (`ResponsesShaper`), and stored, unless `store` is false, with
the whole conversation up to its output for previous_response_id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fleet.api import answers
from fleet.api.answers import Candidate, FrameSource, PromptResult
from fleet.api.chat.protocol import ChatTokenLogprob
from fleet.api.chat.serving import chat_logprobs
from fleet.api.responses.items import item_id
from fleet.api.responses.planning import ResponsesPlan, named_as_responses, responses_field
from fleet.api.responses.protocol import (
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
    ResponseUsage,
    TextDelta,
    TextDone,
)
from fleet.api.responses.store import Stored
from fleet.errors import FleetError
from fleet.wire import protocol

_json = msgspec.json.Encoder()
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
    its function calls; the one max_output_tokens cut "incomplete" (mark_cut)."""
    out: list[OutputItem] = []
    if cand.reasoning and plan.chat.show_reasoning:
        out.append(ReasoningItem(id=item_id("rs"), content=[ReasoningText(text=cand.reasoning)]))
    if cand.text or not cand.calls:
        text = OutputText(text=cand.text, logprobs=token_logprobs(plan, cand.logprobs))
        out.append(OutputMessage(id=item_id("msg"), content=[text]))
    out += [FunctionCall(id=item_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments)
            for _, c in sorted(cand.calls.items())]
    return mark_cut(out, cand.finish_reason)


def mark_cut(output: list[OutputItem], finish_reason: str | None) -> list[OutputItem]:
    """An answer cut at max_output_tokens: the item being written when the limit came is
    "incomplete" (its last; where that is the empty message of an answer that never got past its
    reasoning, that reasoning too), the ones before it "completed"."""
    if finish_reason == "length" and output:
        cut = output[-1].status = "incomplete"
        if (isinstance(output[-1], OutputMessage) and not any(part.text for part in output[-1].content)
                and len(output) > 1 and isinstance(output[-2], ReasoningItem)):
            output[-2].status = cut
    return output


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

    def _close(self, status: str = "completed") -> bytes:
        """The open item's done events, the item `status` in them."""
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
        item.status = status  # type: ignore[assignment]
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
        status = status_of(self.finish)
        item_status = "incomplete" if status == "incomplete" else "completed"  # of the item being written (mark_cut)
        if not any(isinstance(item, (OutputMessage, FunctionCall)) for item in self.output):
            out += self._close(item_status)  # a reasoning that never got to its answer
            _, opened = self._open(OutputMessage(id=item_id("msg"), content=[], status="in_progress"))
            out += opened  # an empty answer is still a message, as the whole Response has it
        out += self._close(item_status)
        response = response_of(self.plan, self.response_id, self.created, self.output, status, usage_of(results[0]))
        await keep(self.plan, response)
        return out + self._e(ResponseIncomplete if status == "incomplete" else ResponseCompleted, response=response)


async def stream(source: FrameSource, plan: ResponsesPlan, model: str) -> Any:
    """A streamed Response (typed SSE events); raises before streaming if the engine refuses."""
    response_id = item_id("resp")
    with named_as_responses():
        return await answers.open_stream(source, plan.chat, ResponsesShaper(plan, response_id), response_id)
