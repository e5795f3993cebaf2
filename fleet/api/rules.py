"""The sampling rules and request checks, each a function whose name says the rule.

The seed's rules are vLLM 0.2.7's, checked in that order before any engine sees a request;
a broken rule is an `InvalidRequest` (HTTP 400) naming the parameter. A `check_*` function only
checks; one that also converts a field is named for what it returns (`stop_sequences`).
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from fleet.api.chat.protocol import ChatMessageIn, ResponseFormat
from fleet.api.protocol import INT32_MAX, StructuredOutputs
from fleet.config.model import Limits
from fleet.errors import InvalidRequest, shown
from fleet.wire import protocol

SAMPLING_EPS = 1e-5
# How deep a JSON Schema a request may send nests (its objects and arrays). The engine compiles a
# schema into a grammar in a time that grows steeply with depth (xgrammar, the default model's
# vocabulary, this VM: 65 levels 0.014 s, 201 levels 0.17 s, 601 levels 3.5 s, 981 levels 14 s),
# and jsonschema's check recurses past Python's limit near 200. OpenAI's structured outputs allow
# 10 levels of objects; 64 levels hold 31 (each object is two: itself and its "properties") and
# the innermost's properties.
SCHEMA_DEPTH = 64
# How many properties its objects may name in all. Optional ones cost the compile most, the more
# of them one object has (the same measure: 256 in one object 0.07 s, 512 0.19 s, 1,000 2.6 s,
# 2,000 8 s, 10,000 more than 5 minutes; 16 objects of 32 0.045 s; 1,000 required 0.16 s). OpenAI
# allows 5,000, all required.
SCHEMA_PROPERTIES = 512
_json = msgspec.json.Encoder()


class SamplingType(enum.Enum):
    BEAM = "beam"
    GREEDY = "greedy"
    RANDOM = "random"


def prompt_list(prompt: str | list[Any], param: str = "prompt") -> list[str | list[int]]:
    """A prompt (an embeddings `input`: `param`) is a string, strings, token ids, or lists of
    token ids; never empty."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequest(f"{param} must not be an empty list", param=param)
    if all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if all(isinstance(p, int) for p in prompt):
        return [_token_ids(prompt, param)]
    if all(isinstance(p, list) for p in prompt):
        return [_token_ids(p, param) for p in prompt]
    raise InvalidRequest(
        f"{param} must be a string, a list of strings, a list of token ids or a list of "
        "token-id lists, not a mix",
        param=param,
    )


def _token_ids(ids: list[int], param: str) -> list[int]:
    if not ids:
        raise InvalidRequest(f"a token-id {param} must not be empty", param=param)
    if any(i < 0 for i in ids):
        raise InvalidRequest("token ids must be >= 0", param=param)
    return ids


def sampling_type(use_beam_search: bool, temperature: float) -> SamplingType:
    """beam -> greedy -> random, decided in that order (vLLM 0.2.7)."""
    if use_beam_search:
        return SamplingType.BEAM
    if temperature < SAMPLING_EPS:
        return SamplingType.GREEDY
    return SamplingType.RANDOM


def check_best_of(n: int, best_of: int, stream: bool) -> None:
    """best_of >= n, and choosing among candidates (best_of > n) cannot be streamed (OpenAI's rule)."""
    if best_of < n:
        raise InvalidRequest(f"best_of must be >= n, got best_of={best_of} and n={n}", param="best_of")
    if stream and best_of > n:
        raise InvalidRequest("best_of > n cannot be used with stream: true", param="best_of")


def check_top_k(top_k: int) -> None:
    """top_k is -1 (disabled) or at least 1."""
    if top_k != -1 and top_k < 1:
        raise InvalidRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}", param="top_k")


def check_beam_search(
    best_of: int, temperature: float, top_p: float, top_k: int, early_stopping: bool | str
) -> None:
    """Beam search: best_of (the beam width) > 1, temperature 0, top_p 1, top_k -1."""
    if best_of <= 1:
        raise InvalidRequest(
            f"best_of (the beam width) must be greater than 1 when using beam search, got {best_of}",
            param="best_of",
        )
    if temperature > SAMPLING_EPS:
        raise InvalidRequest("temperature must be 0 when using beam search", param="temperature")
    if top_p < 1.0 - SAMPLING_EPS:
        raise InvalidRequest("top_p must be 1 when using beam search", param="top_p")
    if top_k != -1:
        raise InvalidRequest("top_k must be -1 when using beam search", param="top_k")
    if early_stopping not in (True, False, "never"):
        raise InvalidRequest(
            f'early_stopping must be true, false or "never", got {early_stopping!r}', param="early_stopping"
        )


def check_beam_search_fields(logit_bias: object, allowed_token_ids: object, bad_words: object) -> None:
    """Beam search ranks hypotheses by the model's own logprobs: fields that would change which
    tokens may come are refused rather than silently ignored."""
    for name, value in (("logit_bias", logit_bias), ("allowed_token_ids", allowed_token_ids), ("bad_words", bad_words)):
        if value:
            raise InvalidRequest(f"{name} cannot be used with use_beam_search", param=name)


def check_not_beam_search(early_stopping: bool | str | None, length_penalty: float | None) -> None:
    """Without beam search, early_stopping must be false and length_penalty 1."""
    if early_stopping not in (None, False):
        raise InvalidRequest("early_stopping is not effective and must be false when not using beam search", param="early_stopping")
    if length_penalty is not None and abs(length_penalty - 1.0) > SAMPLING_EPS:
        raise InvalidRequest(
            "length_penalty is not effective and must be the default value of 1 when not using beam search",
            param="length_penalty",
        )


def check_greedy(best_of: int, n: int) -> None:
    """Greedy sampling (temperature 0) gives one answer: best_of must be 1."""
    if best_of > 1:
        which = "best_of" if best_of != n else "n"
        raise InvalidRequest(
            f"best_of must be 1 when using greedy sampling (temperature 0), got {which}={best_of}; "
            "raise the temperature to get several different completions",
            param=which,
        )


def check_stream_options(stream: bool, has_options: bool) -> None:
    """stream_options is only allowed with stream: true (OpenAI's rule)."""
    if has_options and not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")


def stop_sequences(stop: str | list[str] | None, most: int) -> list[str]:
    """Stop sequences are non-empty strings, at most the model's limits.stop of them: the engine
    searches the new text for each after every token, on the loop every stream of the engine
    shares (vLLM's check_stop_strings: 0.08 ms a token for 1,000 of them, 7.9 ms for 100,000)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stops):
        raise InvalidRequest("stop sequences must not be empty strings", param="stop")
    if len(stops) > most:
        raise InvalidRequest(f"at most {most} stop sequences for this model, got {len(stops)}", param="stop")
    return stops


def allowed_tokens(ids: list[int] | None) -> list[int] | None:
    """allowed_token_ids, when given, allows at least one token (vLLM refuses an empty list)."""
    if ids is not None and not ids:
        raise InvalidRequest("allowed_token_ids must not be empty: it lists the only tokens that may be sampled",
                             param="allowed_token_ids")
    return ids


def bad_word_list(words: list[str] | None, most: int) -> list[str]:
    """bad_words are non-empty strings, at most the model's limits.bad_words of them: the engine
    checks each at every step of the whole batch, a tensor write for each that applies (vLLM's
    apply_bad_words, one-token words on this VM's CPU: 0.24 ms a step for 64, 7.5 ms for 1,000,
    76 ms for 10,000)."""
    words = list(words or ())
    if any(not w for w in words):
        raise InvalidRequest("bad_words must not be empty strings", param="bad_words")
    if len(words) > most:
        raise InvalidRequest(f"at most {most} bad_words for this model, got {len(words)}", param="bad_words")
    return words


def logit_bias_by_token_id(bias: dict[str, float] | None) -> dict[int, float] | None:
    """logit_bias keys are token ids written as strings."""
    if not bias:
        return None
    try:
        parsed = {int(k): float(v) for k, v in bias.items()}
        if any(k > INT32_MAX for k in parsed):
            raise ValueError("too large")
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
    if any(k < 0 for k in parsed):
        raise InvalidRequest("logit_bias keys must be token ids >= 0", param="logit_bias")
    return parsed


def check_suffix(suffix: str | None) -> None:
    """suffix needs fill-in-the-middle support, which no fleet model offers yet."""
    if suffix:
        raise InvalidRequest(
            "suffix is not supported: the model has no fill-in-the-middle tokens fleet can use", param="suffix"
        )


def chat_messages(messages: list[ChatMessageIn]) -> list[protocol.ChatMessage]:
    """A conversation as the engine's chat template takes it: content as text (a string, or text
    parts), an assistant's tool calls, a tool's answer naming the call it answers: each id one of an
    earlier assistant message's calls."""
    out = []
    called: set[str] = set()
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            if any(p.type != "text" or p.text is None for p in m.content):
                raise InvalidRequest("only text content parts are supported", param=f"messages[{i}].content")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        calls = None
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequest("only an assistant's message has tool_calls", param=f"messages[{i}].tool_calls")
            calls = [protocol.ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls]
            called.update(c.id for c in m.tool_calls)
        if m.role == "tool":
            if m.tool_call_id is None:
                raise InvalidRequest("a tool message needs the tool_call_id of the call it answers",
                                     param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in called:
                raise InvalidRequest(f"tool_call_id {shown(m.tool_call_id)} matches no tool call of an earlier "
                                     "assistant message", param=f"messages[{i}].tool_call_id")
        out.append(protocol.ChatMessage("system" if m.role == "developer" else m.role, content, calls,
                                        m.tool_call_id if m.role == "tool" else None, m.name))
    return out


def check_schema_size(schema: Any, param: str) -> None:
    """A JSON Schema nests at most SCHEMA_DEPTH levels of objects and arrays, and its objects name at
    most SCHEMA_PROPERTIES properties in all (measured level by level, never by recursion)."""
    level = [schema] if isinstance(schema, dict | list) else []
    depth = properties = 0
    while level:
        depth += 1
        if depth > SCHEMA_DEPTH:
            raise InvalidRequest(f"the JSON Schema nests deeper than {SCHEMA_DEPTH} levels of objects and arrays",
                                 param=param)
        properties += sum(len(node["properties"]) for node in level
                          if isinstance(node, dict) and isinstance(node.get("properties"), dict))
        if properties > SCHEMA_PROPERTIES:
            raise InvalidRequest(f"the JSON Schema names more than {SCHEMA_PROPERTIES} properties", param=param)
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, dict | list)]


def response_format_structure(fmt: ResponseFormat | None) -> protocol.Structured | None:
    """response_format -> the engine's structured outputs (None: free text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return protocol.Structured(json_object=True, param="response_format")
    if fmt.json_schema is None or fmt.json_schema.schema is None:
        raise InvalidRequest("response_format json_schema needs json_schema.schema", param="response_format")
    check_schema_size(fmt.json_schema.schema, "response_format.json_schema.schema")
    return protocol.Structured(json=_json.encode(fmt.json_schema.schema).decode(), param="response_format.json_schema.schema")


def structured_outputs(given: StructuredOutputs | None) -> protocol.Structured | None:
    """vLLM's structured_outputs: exactly one constraint; a JSON Schema as an object or its text."""
    if given is None:
        return None
    kinds = [k for k in ("json", "json_object", "regex", "choice", "grammar") if getattr(given, k) not in (None, False)]
    if len(kinds) != 1:
        raise InvalidRequest("structured_outputs takes exactly one of json, json_object, regex, choice, grammar"
                             + (f", got {', '.join(kinds)}" if kinds else ""), param="structured_outputs")
    schema = given.json
    if isinstance(schema, str):
        try:
            check_schema_size(msgspec.json.decode(schema), "structured_outputs.json")
        except (msgspec.DecodeError, RecursionError):
            raise InvalidRequest("structured_outputs.json is a JSON Schema: an object, or its JSON text",
                                 param="structured_outputs.json") from None
    elif schema is not None:
        check_schema_size(schema, "structured_outputs.json")
        schema = _json.encode(schema).decode()
    return protocol.Structured(json=schema, json_object=bool(given.json_object), regex=given.regex,
                               choice=given.choice, grammar=given.grammar, param=f"structured_outputs.{kinds[0]}")


def chat_top_logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """Chat asks for logprobs with a flag; top_logprobs needs it."""
    if top_logprobs is not None and not logprobs:
        raise InvalidRequest("top_logprobs requires logprobs: true", param="top_logprobs")
    return (top_logprobs or 0) if logprobs else None


def check_limits(limits: Limits, *, n: int, best_of: int, max_tokens: int | None, prompts: int, size: int,
                 prompt_param: str = "prompt") -> None:
    """The model's per-request caps from fleet.toml ([models.limits])."""
    if n > limits.n:
        raise InvalidRequest(f"n is at most {limits.n} for this model, got {n}", param="n")
    if best_of > limits.best_of:
        raise InvalidRequest(f"best_of is at most {limits.best_of} for this model, got {best_of}", param="best_of")
    if max_tokens is not None and limits.max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(f"max_tokens is at most {limits.max_tokens} for this model, got {max_tokens}",
                             param="max_tokens")
    if prompts > limits.prompts:
        raise InvalidRequest(f"at most {limits.prompts} prompts per request, got {prompts}", param=prompt_param)
    if size > limits.prompt_chars:
        raise InvalidRequest(f"the prompt is too long for this model: {size} characters, at most {limits.prompt_chars}",
                             param=prompt_param)


def check_min_tokens(min_tokens: int, max_tokens: int, *, defaulted: bool = False) -> None:
    """min_tokens cannot exceed max_tokens (vLLM's rule), the one sent or the default one."""
    if min_tokens > max_tokens:
        which = f"the default max_tokens ({max_tokens}); send a larger max_tokens" if defaulted else f"max_tokens ({max_tokens})"
        raise InvalidRequest(f"min_tokens ({min_tokens}) must be at most {which}", param="min_tokens")
