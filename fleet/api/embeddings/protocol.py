"""/v1/embeddings' request and answer, in the order of OpenAI's API reference:
https://platform.openai.com/docs/api-reference/embeddings/create"""

from __future__ import annotations

from typing import Literal

import msgspec

from fleet.api.protocol import PosInt, PromptItem


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings."""

    model: str
    input: str | list[PromptItem]  # a string, strings, token ids, or lists of token ids (rules.prompt_list)
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PosInt | None = None
    user: str | None = None
    stream: Literal[False] | None = None  # there is no streamed form (the gateway's bookkeeping reads it)


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # base64: the float32 values' little-endian bytes
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"
