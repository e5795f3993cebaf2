"""/v1/responses on real engines: the openai SDK (whole, streamed with its helper, continued by
previous_response_id, a function call and its output), LangChain's ChatOpenAI on the Responses
API, and the OpenAI Agents SDK running an agent with a Python function tool.

The packaged default model answers (greedy, float32). It has vLLM's pythonic tool parser: a
forced call ("required", a named function) is held to the tools' schemas by structured outputs,
and after it, "auto" (the Agents SDK's choice once a tool has run) lets the model answer in words.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from fleets import Fleets

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}


def test_a_response_whole_and_streamed_with_the_sdks_helper_say_the_same(default: openai.OpenAI) -> None:
    kw = dict(model="smollm2", input="The capital of France is", temperature=0, max_output_tokens=12)
    whole = default.responses.create(**kw)
    assert whole.output_text and whole.usage.output_tokens > 0
    with default.responses.stream(**kw) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text


def test_output_text_logprobs_are_the_engines_for_each_token_of_the_text(default: openai.OpenAI) -> None:
    r = default.responses.create(model="smollm2", input="The capital of France is", temperature=0, max_output_tokens=8,
                                 include=["message.output_text.logprobs"], top_logprobs=3)
    [part] = r.output[0].content  # type: ignore[union-attr]
    assert part.logprobs is not None and len(part.logprobs) == r.usage.output_tokens  # type: ignore[union-attr]
    assert "".join(lp.token for lp in part.logprobs) == part.text
    for lp in part.logprobs:  # greedy: each token is its position's likeliest, listed first among 3
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token == lp.token and abs(lp.top_logprobs[0].logprob - lp.logprob) < 1e-4


def test_truncation_auto_leaves_out_the_oldest_turns_where_the_conversation_outgrows_the_context(
    tiny: openai.OpenAI,
) -> None:
    """tiny-a's context is 512 tokens; twelve earlier exchanges of ~60 tokens each do not fit."""
    said = " ".join(f"word{i}" for i in range(20))
    earlier = [m for t in range(12) for m in ({"role": "user", "content": f"turn {t}: {said}"},
                                                {"role": "assistant", "content": f"reply {t}: {said}"})]
    asked = dict(model="tiny-a", input=[*earlier, {"role": "user", "content": "and now?"}], instructions="be brief",
                 max_output_tokens=8, temperature=0)
    with pytest.raises(openai.BadRequestError) as refused:
        tiny.responses.create(**asked)  # type: ignore[call-overload]
    assert refused.value.body["param"] == "input" and "512" in refused.value.body["message"]  # type: ignore[index]
    r = tiny.responses.create(**asked, truncation="auto")  # type: ignore[call-overload]
    assert r.truncation == "auto" and r.output_text is not None

    def prompt_tokens(exchanges: int) -> int:
        kept = [*earlier[len(earlier) - 2 * exchanges:], {"role": "user", "content": "and now?"}]
        return tiny.responses.create(**{**asked, "input": kept}).usage.input_tokens  # type: ignore[call-overload, no-any-return]

    exchange = prompt_tokens(2) - prompt_tokens(1)
    assert r.usage is not None and r.usage.input_tokens + 8 <= 512  # room for the answer
    assert r.usage.input_tokens + exchange + 8 > 512  # and as many of the latest exchanges as fit
    assert (r.usage.input_tokens - prompt_tokens(1)) % exchange == 0  # whole exchanges, the instructions kept


def test_previous_response_id_continues_the_conversation(default: openai.OpenAI) -> None:
    first = default.responses.create(model="smollm2", input="My name is Ada.", temperature=0, max_output_tokens=10)
    second = default.responses.create(model="smollm2", input="What is my name?", previous_response_id=first.id,
                                      temperature=0, max_output_tokens=10)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert default.responses.retrieve(second.id).output_text == second.output_text


def test_a_function_call_then_its_output_ends_in_a_message(default: openai.OpenAI) -> None:
    call = default.responses.create(model="smollm2", input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice="required", temperature=0, max_output_tokens=40)
    [item] = [o for o in call.output if o.type == "function_call"]
    assert item.name == "get_weather" and isinstance(json.loads(item.arguments)["city"], str)
    final = default.responses.create(model="smollm2", previous_response_id=call.id, tools=[WEATHER], temperature=0,
                                     max_output_tokens=20, tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}])
    assert final.output_text and not [o for o in final.output if o.type == "function_call"]


def test_langchain_chat_openai_on_the_responses_api(fleets: Fleets) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2", base_url=fleets.ready("default").url + "/v1", api_key="x", temperature=0,
                     max_tokens=12, max_retries=0, use_responses_api=True)
    message = llm.invoke("The capital of France is")
    assert message.text and message.response_metadata.get("id", "").startswith("resp_")


def test_an_agents_sdk_agent_calls_a_python_tool_and_returns_a_final_output(fleets: Fleets) -> None:
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.models.openai_responses import OpenAIResponsesModel

    set_tracing_disabled(True)  # no exporter: nothing leaves this machine
    called: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return f"It is sunny in {city}."

    async def run() -> Any:  # the client closed on the loop that used it (no transport left to the GC)
        async with openai.AsyncOpenAI(base_url=fleets.ready("default").url + "/v1", api_key="x",
                                      max_retries=0) as client:
            agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                          model=OpenAIResponsesModel(model="smollm2", openai_client=client),
                          model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=40))
            return await Runner.run(agent, "What is the weather in Paris?")

    result = asyncio.run(run())
    assert len(called) == 1 and isinstance(result.final_output, str) and result.final_output
    outputs = [item for item in result.new_items if item.type == "tool_call_output_item"]
    assert [o.output for o in outputs] == [f"It is sunny in {called[0]}."]


def test_a_text_format_vllm_cannot_hold_the_answer_to_is_a_400_naming_text_format(default: openai.OpenAI) -> None:
    fmt = {"format": {"type": "json_schema", "name": "n", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}
    with pytest.raises(openai.BadRequestError) as e:
        default.responses.create(model="smollm2", input="a number", text=fmt, max_output_tokens=4)
    assert e.value.param == "text.format.schema" and "Unsatisfiable schema" in e.value.message
