"""Tool calls and reasoning on real engines, through the openai SDK and LangChain.

- The packaged default model (SmolLM2-135M-Instruct, no tool parser) follows a named function and
  tool_choice "required": structured outputs hold its answer to the tools' schemas, so the
  arguments always parse and validate; greedy, the streamed pieces add up to the whole answer.
- tiny-a reads calls in Llama 3's JSON form with vLLM's llama3_json parser (tool_choice "auto"). A
  random tiny model would not write that form by itself, so the test holds its answer to it with
  vLLM's structured_outputs extension (a regular expression of {"name", "parameters"}, compact: a
  JSON Schema lets a random model write whitespace until max_tokens): what is under test is that
  the parser, on a real engine's output, turns it into tool_calls.
- tiny-r (tiny-a's weights, vLLM's deepseek_r1 reasoning parser) samples only two tokens, a word and
  </think>, from a fixed seed: its chat answer's reasoning and content must be the two sides of
  the first </think> in the same sampling through /v1/completions (where no parser reads apart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from fleets import Fleets

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                                         "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def streamed_calls(chunks: list[Any]) -> list[tuple[str, str, str]]:
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for c in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(c.index, ["", "", ""])
            call[0] = c.id or call[0]
            call[1] = (c.function.name if c.function and c.function.name else None) or call[1]
            call[2] += (c.function.arguments or "") if c.function else ""
    return [(i, n, a) for i, n, a in calls.values()]


def test_a_named_function_on_the_default_model_gets_arguments_that_validate_whole_and_streamed(
        default: openai.OpenAI) -> None:
    kw = dict(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED, temperature=0, max_tokens=60)
    whole = default.chat.completions.create(**kw)
    [call] = whole.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    chunks = list(default.chat.completions.create(**kw, stream=True))
    assert [(n, a) for _, n, a in streamed_calls(chunks)] == [("get_weather", call.function.arguments)]


def test_required_on_the_default_model_calls_tools_whose_arguments_validate(default: openai.OpenAI) -> None:
    kw = dict(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=120)
    whole = default.chat.completions.create(**kw)
    calls = whole.choices[0].message.tool_calls or []
    assert calls and whole.choices[0].finish_reason == "tool_calls"
    schemas = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME["function"]["parameters"]}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert call.id and call.type == "function"
    chunks = list(default.chat.completions.create(**kw, stream=True))
    assert [(n, json.loads(a)) for _, n, a in streamed_calls(chunks)] == [
        (c.function.name, json.loads(c.function.arguments)) for c in calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_tools_result_goes_back_and_the_model_answers_in_words(default: openai.OpenAI) -> None:
    first = default.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice=NAMED,
                                            temperature=0, max_tokens=60)
    call = (first.choices[0].message.tool_calls or [])[0]
    messages = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    final = default.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], tool_choice="none",
                                            temperature=0, max_tokens=20)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


LLAMA3_CALL = r'\{"name": "get_weather", "parameters": \{"city": "[A-Za-z]{1,12}", "unit": "(celsius|fahrenheit)"\}\}'


def test_auto_reads_a_call_in_the_models_own_format_through_vllms_parser_whole_and_streamed(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=0, max_tokens=150,
              extra_body={"structured_outputs": {"regex": LLAMA3_CALL}})
    whole = tiny.chat.completions.create(**kw)
    [call] = whole.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and whole.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert not whole.choices[0].message.content
    chunks = list(tiny.chat.completions.create(**kw, stream=True))
    [(_, name, arguments)] = streamed_calls(chunks)
    assert name == "get_weather" and json.loads(arguments) == json.loads(call.function.arguments)


def test_an_answer_without_a_call_under_auto_stays_content(tiny: openai.OpenAI) -> None:
    r = tiny.chat.completions.create(model="tiny-a", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=8,
                                     extra_body={"bad_words": ["{"]})
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def words(tiny_model: Path) -> tuple[int, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return tok.encode(" Paris")[0], tok.convert_tokens_to_ids("</think>")


def test_reasoning_and_content_are_the_two_sides_of_the_first_think_end(fleets: Fleets, tiny: openai.OpenAI,
                                                                           words: tuple[int, int]) -> None:
    import httpx

    sampling = dict(temperature=1.0, seed=11, max_tokens=12, extra_body={"allowed_token_ids": list(words), "ignore_eos": True})
    ids = httpx.post(f"{fleets.ready('tiny').url}/tokenize", json={"model": "tiny-r", "messages": ASK}, timeout=30).json()["tokens"]
    raw = tiny.completions.create(model="tiny-r", prompt=ids, **sampling).choices[0].text
    assert "</think>" in raw, f"pick another seed: {raw!r} has no </think>"
    reasoning, _, content = raw.partition("</think>")
    whole = tiny.chat.completions.create(model="tiny-r", messages=ASK, **sampling)
    message = whole.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content or "") == (reasoning, content)
    chunks = list(tiny.chat.completions.create(model="tiny-r", messages=ASK, stream=True, **sampling))
    streamed_reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or ""
                                 for c in chunks if c.choices)
    assert (streamed_reasoning, "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)) == (reasoning, content)


def test_langchain_bind_tools_returns_tool_calls(fleets: Fleets) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    llm = ChatOpenAI(model="smollm2", base_url=fleets.ready("default").url + "/v1", api_key="x", temperature=0,
                     max_tokens=40, max_retries=0)
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str) and call["id"]
    assert get_weather.invoke(call["args"]).startswith("sunny in ")


def test_a_langchain_agent_calls_a_python_tool_and_finishes_with_its_result(fleets: Fleets) -> None:
    """create_agent's loop with a middleware that forces the tool on the first model call (a 135M
    model would not choose it by itself) and no tool after it: the agent calls the Python function,
    hands its result back, and the model ends the run with a message."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRequest, wrap_model_call
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    called: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return f"It is sunny in {city}."

    @wrap_model_call
    def tool_first(request: ModelRequest, handler: Any) -> Any:
        answered = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if answered else "get_weather"))

    llm = ChatOpenAI(model="smollm2", base_url=fleets.ready("default").url + "/v1", api_key="x", temperature=0,
                     max_tokens=40, max_retries=0)
    agent = create_agent(llm, tools=[get_weather], middleware=[tool_first])
    state = agent.invoke({"messages": [{"role": "user", "content": "What is the weather in Paris?"}]})
    messages = state["messages"]
    assert len(called) == 1
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.content for m in results] == [f"It is sunny in {called[0]}."]
    assert isinstance(messages[-1], AIMessage) and messages[-1].content and not messages[-1].tool_calls
