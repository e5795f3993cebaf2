"""OpenAI's schemas shared by every endpoint, as msgspec Structs (the gateway's hot path): the
sampling fields both generation requests carry, usage, the model list and the error envelope.
Each endpoint's own schemas live beside it (completions/protocol.py, chat/protocol.py).

Decisions:
- An explicit ``null`` means "not set" (LangChain sends ``"logprobs": null``), so every
  optional field defaults to ``None``.
- Unknown fields are accepted and ignored, as vLLM's server does: clients add fields over
  time (``parallel_tool_calls``, ``store``...) and rejecting them breaks working code.
- Ranges are checked here (msgspec ``Meta``); rules that relate fields to each other are the
  ``check_*`` functions of rules.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from fleet.errors import FleetError

INT32_MAX = 2**31 - 1  # every count and id the engine takes fits in it; larger is a 400, not an overflow
NonNegInt = Annotated[int, Meta(ge=0, le=INT32_MAX)]
PosInt = Annotated[int, Meta(ge=1, le=INT32_MAX)]
FinishReason = Literal["stop", "length"]  # OpenAI's; an aborted sequence reports stop
TokenId = Annotated[int, Meta(le=INT32_MAX)]  # negative ids are refused by rules.check_prompt
PromptItem = str | TokenId | list[TokenId]  # one prompt of several, or one token id of a prompt (rules.prompt_list)
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    # vLLM's extension: every chunk also carries usage, its choice's tokens so far (with include_usage)
    continuous_usage_stats: bool | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True):
    """vLLM's structured_outputs extension: exactly one of a JSON Schema (an object, or its JSON
    text), any JSON object, a regular expression, one of some strings, a grammar (EBNF). Whether
    JSON may hold whitespace is the engine's setting (engine_args' structured_outputs_config)."""

    json: dict[str, Any] | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Meta(min_length=1)] | None = None
    grammar: str | None = None


class SamplingRequest(msgspec.Struct, kw_only=True):
    """The fields /v1/completions and /v1/chat/completions share, vLLM's extensions included."""

    model: str
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Meta(ge=-100, le=100)]] | None = None
    n: PosInt | None = None  # its cap is the model's [models.limits] n (rules.check_limits names it)
    presence_penalty: Penalty | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    user: str | None = None
    best_of: PosInt | None = None  # likewise, limits.best_of
    # vLLM extensions (sent through the SDK's extra_body)
    top_k: Annotated[int, Meta(le=INT32_MAX)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: NonNegInt | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[NonNegInt] | None = None
    allowed_token_ids: list[NonNegInt] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # words that are never generated
    use_beam_search: bool | None = None
    length_penalty: Annotated[float, Meta(ge=-10.0, le=10.0)] | None = None
    early_stopping: bool | Literal["never"] | None = None
    structured_outputs: StructuredOutputs | None = None


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # of the prompt's tokens, found in vLLM's prefix cache


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None  # in whole answers and a stream's final usage


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    state: str
    max_model_len: int | None = None
    task: Literal["generate", "embed"] = "generate"  # what it serves: completions and chat, or embeddings
    object: str = "model"
    root: str | None = None  # a LoRA adapter: its directory (as `vllm serve` lists one)
    parent: str | None = None  # a LoRA adapter: its base model


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    """OpenAI's error envelope, for plain HTTP errors and for an error event in a stream alike."""

    error: ErrorBody

    @classmethod
    def of(cls, error: FleetError) -> ErrorResponse:
        """The envelope of one of fleet's errors."""
        return cls(ErrorBody(error.message, error.type, error.param, error.code))
