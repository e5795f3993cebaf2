"""/v1/completions' request, answer and stream chunk, in the order of OpenAI's API reference:
https://platform.openai.com/docs/api-reference/completions/create"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from fleet.api.protocol import FinishReason, PosInt, PromptItem, SamplingRequest, Usage


class CompletionRequest(SamplingRequest, kw_only=True):
    """POST /v1/completions."""

    prompt: str | list[PromptItem]
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    max_tokens: PosInt | None = None
    suffix: str | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"


class CompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"
