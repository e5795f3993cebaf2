"""OpenAI request and response objects, as msgspec Structs (the gateway's hot path).

Fields follow the order of OpenAI's API reference:
https://platform.openai.com/docs/api-reference/completions/create

Decisions:
- An explicit ``null`` means "not set" (LangChain sends ``"logprobs": null``), so every
  optional field defaults to ``None``.
- Unknown fields are accepted and ignored, as vLLM's server does: clients add fields over
  time (``parallel_tool_calls``, ``store``...) and rejecting them breaks working code.
- Ranges are checked here (msgspec ``Meta``); rules that relate fields to each other live
  in translate.py as ``check_*`` functions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

INT32_MAX = 2**31 - 1  # every count and id the engine takes fits in it; larger is a 400, not an overflow
NonNegInt = Annotated[int, Meta(ge=0, le=INT32_MAX)]
PosInt = Annotated[int, Meta(ge=1, le=INT32_MAX)]
TokenId = Annotated[int, Meta(le=INT32_MAX)]  # negative ids are refused by rules.check_prompt
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PromptItem = Union[str, TokenId, list[TokenId]]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class SamplingRequest(msgspec.Struct, kw_only=True):
    """The fields /v1/completions and /v1/chat/completions share, vLLM's extensions included."""

    model: str
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None
    # vLLM extensions (sent through the SDK's extra_body)
    top_k: Annotated[int, Meta(le=INT32_MAX)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: NonNegInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[NonNegInt] | None = None
    use_beam_search: bool | None = None
    length_penalty: Annotated[float, Meta(ge=-10.0, le=10.0)] | None = None
    early_stopping: bool | Literal["never"] | None = None


class CompletionRequest(SamplingRequest, kw_only=True):
    """POST /v1/completions."""

    prompt: str | list[PromptItem]
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: PosInt | None = None
    suffix: str | None = None


# --- chat -----------------------------------------------------------------------------------
# https://platform.openai.com/docs/api-reference/chat/create


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest, kw_only=True):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessageIn], Meta(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_completion_tokens: PosInt | None = None
    max_tokens: PosInt | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM extensions
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"


class Health(msgspec.Struct):
    status: Literal["ok"]
    models: dict[str, str]  # model name -> lifecycle state


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    state: str
    max_model_len: int | None = None
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ChatMessageOut(msgspec.Struct):
    content: str | None
    role: str = "assistant"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob] | None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class CompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"
