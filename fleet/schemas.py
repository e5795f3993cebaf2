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

from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta

NonNegInt = Annotated[int, Meta(ge=0)]
PosInt = Annotated[int, Meta(ge=1)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PromptItem = Union[str, int, list[int]]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class CompletionRequest(msgspec.Struct, kw_only=True):
    """POST /v1/completions."""

    model: str
    prompt: str | list[PromptItem]
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: PosInt | None = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    presence_penalty: Penalty | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Annotated[float, Meta(ge=0.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    # vLLM extensions (sent through the SDK's extra_body)
    top_k: int | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: NonNegInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    early_stopping: bool | Literal["never"] | None = None


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


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
