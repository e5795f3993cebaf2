"""vLLM's /tokenize and /detokenize requests and answers (vllm/entrypoints/serve/tokenize): a
completion prompt or chat messages in, token ids (and optionally their strings) out; ids in, text out."""

from __future__ import annotations

import msgspec

from fleet.api.chat.protocol import ChatMessageIn
from fleet.api.protocol import TokenId


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /tokenize: `prompt` (a completion's) or `messages` (a chat's, through the model's template)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages (the template adds them)
    add_generation_prompt: bool | None = None  # messages: default true
    continue_final_message: bool | None = None
    return_token_strs: bool | None = None


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    """POST /detokenize."""

    model: str
    tokens: list[TokenId]


class DetokenizeResponse(msgspec.Struct):
    prompt: str
