"""An answer read apart on the engine (fleet/engine/parsing.py): vLLM's own tool and reasoning
parsers on the tiny model's tokenizer (which has their markup tokens), and the "required" array
read as it streams. Streamed pieces must add up to what the whole answer gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.engine.parsing import Parsers, RequiredCalls, required_calls
from fleet.wire import protocol

WEATHER = protocol.Tool("get_weather", "the weather", json.dumps({"type": "object", "properties": {"city": {"type": "string"}}}))
CHAT = protocol.Chat([protocol.ChatMessage("user", "weather in Paris?")], tools=[WEATHER])


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def joined(pieces: list) -> dict[int, tuple[str | None, str | None, str]]:  # type: ignore[type-arg]
    """Tool-call pieces folded into each call's (id, name, arguments)."""
    calls: dict[int, list] = {}  # type: ignore[type-arg]
    for piece in pieces:
        call = calls.setdefault(piece.index, [None, None, ""])
        call[0], call[1] = piece.id or call[0], piece.name or call[1]
        call[2] += piece.arguments
    return {k: (c[0], c[1], c[2]) for k, c in calls.items()}


def streamed(parsers: Parsers, req: protocol.GenerateRequest, text: str, tokenizer) -> tuple[str, str, list]:  # type: ignore[no-untyped-def, type-arg]
    """The answer fed one token at a time: (content, reasoning, call pieces)."""
    reader = parsers.reader(req, parsers.request(req))
    assert reader is not None
    ids = tokenizer.encode(text)
    pieces = [reader.step(tokenizer.decode(ids[k:k + 1]), ids[k:k + 1]) for k in range(len(ids))]
    return "".join(p.content for p in pieces), "".join(p.reasoning for p in pieces), [c for p in pieces for c in p.calls]


ARRAY = '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris}", "days": [1, {"x": 2}]}}, {"parameters": {}, "name": "noop"}]'


@pytest.mark.parametrize("size", [1, 2, 5, len(ARRAY)])
def test_the_required_array_read_in_any_pieces_gives_each_calls_name_first_then_its_arguments(size: int) -> None:
    reader = RequiredCalls()
    pieces = [d for k in range(0, len(ARRAY), size) for d in reader.feed(ARRAY[k:k + size])]
    calls = joined(pieces)
    assert [(c[1], json.loads(c[2])) for c in calls.values()] == [
        ("get_weather", {"city": 'Pa"ris}', "days": [1, {"x": 2}]}), ("noop", {})]
    assert all(c[0] and c[0].startswith("call_") for c in calls.values())
    first_of_each = {}
    for d in pieces:
        first_of_each.setdefault(d.index, d)
    assert all(d.id and d.name for d in first_of_each.values())  # id and name come first
    assert [(c.name, json.loads(c.arguments)) for c in required_calls(ARRAY)] == [
        (c[1], json.loads(c[2])) for c in calls.values()]


@pytest.mark.parametrize(("parser", "answer", "content"), [
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', ""),
    ("hermes", 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Let me look. "),
])
def test_auto_reads_a_call_in_the_models_format_with_vllms_parser_whole_and_streamed(
        tokenizer, parser: str, answer: str, content: str) -> None:  # type: ignore[no-untyped-def]
    parsers = Parsers(tokenizer, parser, None)
    req = protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("auto"))
    whole = parsers.reader(req, parsers.request(req)).whole(answer)  # type: ignore[union-attr]
    assert whole.content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [("get_weather", {"city": "Paris"})]
    text, _, pieces = streamed(parsers, req, answer, tokenizer)
    assert text.strip() == content.strip()
    assert [(c[1], json.loads(c[2])) for c in joined(pieces).values()] == [("get_weather", {"city": "Paris"})]


def test_an_answer_without_a_call_stays_content_under_auto(tokenizer) -> None:  # type: ignore[no-untyped-def]
    parsers = Parsers(tokenizer, "hermes", None)
    req = protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("auto"))
    piece = parsers.reader(req, parsers.request(req)).whole("It is sunny.")  # type: ignore[union-attr]
    assert (piece.content, piece.calls) == ("It is sunny.", [])


def test_hermes_asks_the_engine_to_keep_special_tokens_for_its_markup(tokenizer) -> None:  # type: ignore[no-untyped-def]
    parsers = Parsers(tokenizer, "hermes", None)
    assert parsers.request(protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("auto"))).skip_special_tokens is False


def test_reasoning_comes_apart_from_the_content_whole_and_streamed(tokenizer) -> None:  # type: ignore[no-untyped-def]
    parsers = Parsers(tokenizer, None, "deepseek_r1")
    req = protocol.GenerateRequest("r", CHAT, reasoning=True)
    whole = parsers.reader(req, parsers.request(req)).whole("It is a city</think>Paris is sunny")  # type: ignore[union-attr]
    assert (whole.reasoning, whole.content) == ("It is a city", "Paris is sunny")
    content, reasoning, _ = streamed(parsers, req, "It is a city</think>Paris is sunny", tokenizer)
    assert (reasoning, content) == ("It is a city", "Paris is sunny")


def test_a_named_call_is_the_whole_answer_as_its_arguments(tokenizer) -> None:  # type: ignore[no-untyped-def]
    parsers = Parsers(tokenizer, None, None)
    req = protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("named", "get_weather"))
    answer = '{"city": "Paris"}'
    assert [(c.name, c.arguments) for c in parsers.reader(req, parsers.request(req)).whole(answer).calls] == [  # type: ignore[union-attr]
        ("get_weather", answer)]
    _, _, pieces = streamed(parsers, req, answer, tokenizer)
    assert next(iter(joined(pieces).values()))[1:] == ("get_weather", answer)


def test_a_forced_call_is_read_without_vllms_request_object_and_auto_with_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Named and "required" calls are fleet's own reading: no vLLM request model is built for them
    (~20 us a request); "auto" hands vLLM's parser the request it reads."""
    parsers = Parsers(tokenizer, "hermes", None)
    required = protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("required"))
    assert parsers.request(required) is None
    calls = parsers.reader(required, None).whole(ARRAY).calls  # type: ignore[union-attr]
    assert [c.name for c in calls] == [c.name for c in required_calls(ARRAY)]
    assert parsers.request(protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("named", "get_weather"))) is None
    assert parsers.request(protocol.GenerateRequest("r", CHAT, tools=protocol.ToolUse("auto"))) is not None


def test_an_unknown_parser_fails_the_engines_start() -> None:
    with pytest.raises(KeyError):
        Parsers(None, "no_such_parser", None)
