"""/v1/responses' request, answer and stream events, in the shapes of OpenAI's API reference
(https://platform.openai.com/docs/api-reference/responses) and the openai package's own types
(openai/types/responses/): the request's fields fleet reads (others are accepted and ignored, as
for every route), the Response object, its output items and usage, and the typed stream events.

Input items stay plain JSON objects here (`input` as a list of dicts): they take many shapes
(OpenAI's EasyInputMessage has no `type`), so items.py reads each one and names the one that is
wrong (`input[2].call_id`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from fleet.api.chat.protocol import ChatTokenLogprob  # a token's logprobs: chat's shape is the Responses API's
from fleet.api.protocol import PosInt


class FunctionTool(msgspec.Struct, kw_only=True):
    """One tool of a request. Only "function" tools are fleet's to run (any other type, a built-in
    tool such as web_search or file_search, is refused naming it: items.tools_of)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: str


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class TextFormat(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    effort: str | None = None
    summary: str | None = None


# what `include` may name (openai's ResponseIncludable): only the output text's logprobs change
# fleet's answer; the rest name outputs of built-in tools, which fleet refuses, or encrypted
# reasoning, which fleet never makes (its reasoning items carry their text in the clear)
Includable = Literal["message.output_text.logprobs", "reasoning.encrypted_content", "file_search_call.results",
                     "web_search_call.results", "web_search_call.action.sources", "message.input_image.image_url",
                     "computer_call_output.output.image_url", "code_interpreter_call.outputs"]
OUTPUT_LOGPROBS: Includable = "message.output_text.logprobs"

Metadata = Annotated[dict[Annotated[str, Meta(max_length=64)], Annotated[str, Meta(max_length=512)]], Meta(max_length=16)]


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """POST /v1/responses."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: PosInt | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    reasoning: ReasoningConfig | None = None
    metadata: Metadata | None = None
    user: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    stream: bool | None = None
    include: list[Includable] | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    truncation: Literal["auto", "disabled"] | None = None  # "auto": the oldest turns left out to fit the context
    # read only to be refused (serving.check_unsupported): each would change the answer unseen
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None  # vLLM's extension


# --- the answer ----------------------------------------------------------------------------------


class OutputText(msgspec.Struct, kw_only=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[ChatTokenLogprob] | None = None  # with include "message.output_text.logprobs" or top_logprobs


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    content: list[OutputText]
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"


class FunctionCall(msgspec.Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ReasoningText(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning_text"):
    text: str


class ReasoningItem(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning"):
    id: str
    summary: list[Any] = []
    content: list[ReasoningText] = []
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | FunctionCall | ReasoningItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int  # of the input's, found in vLLM's prefix cache
    cache_write_tokens: int  # OpenAI's explicit cache writes: none here, always 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(msgspec.Struct):
    code: str
    message: str


class Response(msgspec.Struct, kw_only=True):
    """The Response object: what POST /v1/responses answers (whole, or in response.completed),
    and what GET /v1/responses/{id} gives back."""

    id: str
    created_at: int
    model: str
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    output: list[OutputItem]
    parallel_tool_calls: bool
    tool_choice: ToolChoice
    tools: list[FunctionTool]
    usage: ResponseUsage | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    metadata: dict[str, str] = {}
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    text: TextConfig | None = None
    user: str | None = None
    store: bool = True
    top_logprobs: int | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    object: Literal["response"] = "response"


class DeletedResponse(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["response"] = "response"


class InputItemList(msgspec.Struct):
    """GET /v1/responses/{id}/input_items: the items the response was asked with, in order."""

    data: list[dict[str, Any]]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


# --- stream events (each written as `event: <type>` and `data: <the event>`) --------------------


class ResponseEvent(msgspec.Struct, kw_only=True, tag_field="type"):
    """Every stream event carries its type and its place in the stream (from 0)."""

    sequence_number: int


class ResponseCreated(ResponseEvent, tag="response.created"):
    response: Response


class ResponseInProgress(ResponseEvent, tag="response.in_progress"):
    response: Response


class ResponseCompleted(ResponseEvent, tag="response.completed"):
    response: Response


class ResponseIncomplete(ResponseEvent, tag="response.incomplete"):
    response: Response


class ItemAdded(ResponseEvent, tag="response.output_item.added"):
    output_index: int
    item: OutputItem


class ItemDone(ResponseEvent, tag="response.output_item.done"):
    output_index: int
    item: OutputItem


class ItemEvent(ResponseEvent):
    """An event about one output item (the item's id and its place in `output`)."""

    item_id: str
    output_index: int


class PartEvent(ItemEvent):
    """An event about one content part of a message or reasoning item."""

    content_index: int


class ContentPartAdded(PartEvent, tag="response.content_part.added"):
    part: OutputText | ReasoningText


class ContentPartDone(PartEvent, tag="response.content_part.done"):
    part: OutputText | ReasoningText


class TextDelta(PartEvent, tag="response.output_text.delta"):
    delta: str
    logprobs: list[ChatTokenLogprob] = []


class TextDone(PartEvent, tag="response.output_text.done"):
    text: str
    logprobs: list[ChatTokenLogprob] = []


class ReasoningDelta(PartEvent, tag="response.reasoning_text.delta"):
    delta: str


class ReasoningDone(PartEvent, tag="response.reasoning_text.done"):
    text: str


class ArgumentsDelta(ItemEvent, tag="response.function_call_arguments.delta"):
    delta: str


class ArgumentsDone(ItemEvent, tag="response.function_call_arguments.done"):
    arguments: str
    name: str


class ErrorEvent(ResponseEvent, tag="error"):
    message: str
    code: str | None = None
    param: str | None = None


Event = (ResponseCreated | ResponseInProgress | ResponseCompleted | ResponseIncomplete | ItemAdded | ItemDone
         | ContentPartAdded | ContentPartDone | TextDelta | TextDone | ReasoningDelta | ReasoningDone
         | ArgumentsDelta | ArgumentsDone | ErrorEvent)
