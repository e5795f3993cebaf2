"""Chat with tools and reasoning through the real gateway, on fake engines (tests/fake_engine.py
reads a chat apart as the real engine does: a call of the named or first tool whose arguments come
in three pieces, "fake thought" as reasoning): the answer's shape in OpenAI's types, whole and
streamed, and the finish reasons."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fleets import FakeFleets, InProcessFleet
from openai.types.chat import ChatCompletion, ChatCompletionChunk

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"word": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "weather?"}]


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets) -> InProcessFleet:
    return module_fake_fleet({"name": "plain"}, {"name": "parsed", "tool_parser": "hermes"},
                             {"name": "thinking", "reasoning_parser": "deepseek_r1"})


@pytest.fixture(scope="module")
def sdk(fleet: InProcessFleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=15) as client:
        yield client


def streamed_calls(chunks: list[ChatCompletionChunk]) -> dict[int, dict[str, Any]]:
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for c in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(c.index, {"id": None, "name": None, "arguments": ""})
            if c.id:
                assert call["id"] is None and c.type == "function" and c.function and c.function.name  # id, type, name first
                call["id"], call["name"] = c.id, c.function.name
            call["arguments"] += (c.function.arguments or "") if c.function else ""
    return calls


@pytest.mark.parametrize(("model", "choice", "finish"), [
    ("plain", {"type": "function", "function": {"name": "get_weather"}}, "stop"),  # a forced function: OpenAI's "stop"
    ("plain", "required", "tool_calls"),
    ("parsed", "auto", "tool_calls"),
])
def test_a_call_comes_as_openais_tool_calls_whole_and_streamed_alike(
        sdk: openai.OpenAI, model: str, choice: Any, finish: str) -> None:
    whole = sdk.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice=choice)
    assert isinstance(whole, ChatCompletion)
    message = whole.choices[0].message
    assert message.content is None and whole.choices[0].finish_reason == finish
    [call] = message.tool_calls or []
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather", {"word": "w0"})
    chunks = list(sdk.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice=choice, stream=True))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [finish]
    assert [(c["name"], c["arguments"]) for c in streamed_calls(chunks).values()] == [
        ("get_weather", call.function.arguments)]


def test_auto_on_a_model_without_a_tool_parser_is_a_400_saying_what_to_configure(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="plain", messages=ASK, tools=[WEATHER])
    assert e.value.body["param"] == "tool_choice" and "tool_parser" in e.value.body["message"]


def test_reasoning_comes_apart_as_reasoning_content_whole_and_streamed(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model="thinking", messages=ASK)
    message = whole.choices[0].message
    assert message.content == "ok" and message.model_extra["reasoning_content"] == "fake thought"
    chunks = list(sdk.chat.completions.create(model="thinking", messages=ASK, stream=True))
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (reasoning, content) == ("fake thought", "ok")
    hidden = sdk.chat.completions.create(model="thinking", messages=ASK, extra_body={"include_reasoning": False})
    assert hidden.choices[0].message.content == "ok" and "reasoning_content" not in (hidden.choices[0].message.model_extra or {})


def test_a_tool_answer_with_no_earlier_call_is_a_400_naming_its_tool_call_id(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="plain", messages=[*ASK, {"role": "tool", "tool_call_id": "x", "content": "y"}])
    assert e.value.body["param"] == "messages[1].tool_call_id"
