"""/tokenize and /detokenize: one request to the model's engine, which holds the tokenizer."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from fleet.api import answers
from fleet.api.answers import FrameSource
from fleet.api.rules import chat_messages
from fleet.api.tokens.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from fleet.errors import InvalidRequest
from fleet.wire import protocol

_json = msgspec.json.Encoder()


def engine_tokenize_request(req: TokenizeRequest) -> protocol.TokenizeRequest:
    """Exactly one of `prompt` and `messages`; their defaults as vLLM's."""
    if (req.prompt is None) == (req.messages is None):
        raise InvalidRequest("send either prompt (text) or messages (a chat), one of them", param="prompt")
    strs = bool(req.return_token_strs)
    if req.messages is not None:
        if not req.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        chat = protocol.Chat(chat_messages(req.messages),
                             add_generation_prompt=req.add_generation_prompt is not False,
                             continue_final_message=bool(req.continue_final_message))
        return protocol.TokenizeRequest(chat, add_special_tokens=bool(req.add_special_tokens), token_strs=strs)
    assert req.prompt is not None
    return protocol.TokenizeRequest(req.prompt, add_special_tokens=req.add_special_tokens is not False,
                                    token_strs=strs)


def plan_tokens(req: TokenizeRequest | DetokenizeRequest, _model: object) -> TokenizeRequest | DetokenizeRequest:
    """Nothing to plan: the request goes to the engine as it is."""
    return req


async def tokenize(source: FrameSource, req: TokenizeRequest, model: str = "") -> bytes:
    """The prompt's tokens as the model's engine counts them for /v1/completions and chat."""
    tokens = await _one(source, "/tokenize", engine_tokenize_request(req), protocol.Tokens)
    return _json.encode(TokenizeResponse(len(tokens.ids), tokens.max_model_len, tokens.ids, tokens.strs))


async def detokenize(source: FrameSource, req: DetokenizeRequest, model: str = "") -> bytes:
    """The text of token ids."""
    if any(t < 0 for t in req.tokens):
        raise InvalidRequest("token ids must be >= 0", param="tokens")
    text = await _one(source, "/detokenize", protocol.DetokenizeRequest(req.tokens), protocol.Text)
    return _json.encode(DetokenizeResponse(text.text))


F = TypeVar("F", protocol.Tokens, protocol.Text)


async def _one(source: FrameSource, path: str, req: msgspec.Struct, kind: type[F]) -> F:
    found: F | None = None
    async for batch in source.call(path, req):
        for frame in batch:
            if isinstance(frame, protocol.Error):
                raise answers.frame_error(frame)
            if isinstance(frame, kind):
                found = frame
    if found is None:
        raise answers.frame_error(protocol.Error(f"the engine sent no answer to {path}"))
    return found
