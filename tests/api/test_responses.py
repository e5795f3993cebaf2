"""A Responses request read and planned as a chat (fleet/api/responses/items.py and serving.py):
its input items, its tools, its errors named by the Responses API's own fields."""

from __future__ import annotations

import json
import re
import typing
from typing import Any

import msgspec
import pytest

from fleet.api.endpoint import Caller
from fleet.api.responses.items import chat_messages, input_items
from fleet.api.responses.planning import Resolved, plan_responses
from fleet.api.responses.protocol import OUTPUT_LOGPROBS, Includable, ResponsesRequest
from fleet.api.responses.serving import without_logprobs
from fleet.api.responses.store import Stored
from fleet.config.model import ModelConfig
from fleet.errors import InvalidRequest
from fleet.wire import protocol

MODEL = ModelConfig(name="m", source="x", port=1)
WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def request(**body: Any) -> ResponsesRequest:
    return msgspec.convert({"model": "m", "input": "hi", **body}, ResponsesRequest)


def planned(model: ModelConfig = MODEL, previous: Stored | None = None, **body: Any) -> Any:
    return plan_responses(Resolved(request(**body), Caller(), previous), model)


def refused(param: str, model: ModelConfig = MODEL, **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        planned(model, **body)
    assert e.value.param == param, e.value.message
    return e.value


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    p = planned(instructions="Be brief.")
    assert p.chat.prompts[0].messages == [protocol.ChatMessage("system", "Be brief."), protocol.ChatMessage("user", "hi")]
    [item] = p.items
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")


def test_function_calls_join_the_assistant_turn_and_their_outputs_answer_them() -> None:
    items = [{"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
             {"type": "reasoning", "id": "rs_1", "summary": []}]
    p = planned(input=items, tools=[WEATHER], tool_choice="none")
    assert p.chat.prompts[0].messages == [
        protocol.ChatMessage("user", "weather?"),
        protocol.ChatMessage("assistant", "", [protocol.ToolCall("call_1", "get_weather", '{"city": "Paris"}')]),
        protocol.ChatMessage("tool", "sunny", None, "call_1"),
    ]  # the reasoning item is kept among the input items, never rendered
    assert [i["type"] for i in p.items] == ["message", "function_call", "function_call_output", "reasoning"]


def test_a_previous_responses_transcript_comes_first_and_its_instructions_do_not() -> None:
    earlier = [*input_items("first"), {"id": "msg_x", "type": "message", "role": "assistant",
                                         "content": [{"type": "output_text", "text": "answer"}]}]
    previous = Stored("resp_1", "", 0, "{}", [], earlier)
    p = planned(previous=previous, input="second")
    assert [(m.role, m.content) for m in p.chat.prompts[0].messages] == [
        ("user", "first"), ("assistant", "answer"), ("user", "second")]
    assert [i["role"] for i in p.transcript] == ["user", "assistant", "user"]


def test_tools_and_text_format_become_the_chats_and_a_forced_function_is_held_to_its_schema() -> None:
    p = planned(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    assert p.chat.tools == protocol.ToolUse("named", "get_weather")
    assert json.loads(p.chat.sampling.structured.json) == WEATHER["parameters"]
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}}}
    assert json.loads(planned(text=fmt).chat.sampling.structured.json) == {"type": "object"}
    assert planned(max_output_tokens=7).chat.sampling.max_tokens == 7


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "built-in tool 'web_search'"),
    ({"tools": [{"type": "file_search"}]}, "tools[0].type", "file_search"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "objekt"}}], "tool_choice": "required"},
     "tools[0].parameters", "not a JSON Schema"),
    ({"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]}, "input[0].call_id", "matches no"),
    ({"input": [{"type": "image_generation_call"}]}, "input[0].type", "not supported"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type",
     "only text"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text",
     "the input_text part's text is a string"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]}, "input[1].output",
     "output is a string or a list of text parts"),
    ({"tools": [WEATHER], "tool_choice": "required", "text": {"format": {"type": "json_object"}}}, "text.format",
     "response_format"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "no reasoning parser"),
    ({"background": True}, "background", "within the request"),
    ({"conversation": "conv_1"}, "conversation", "previous_response_id"),
    ({"conversation": {"id": "conv_1"}}, "conversation", "previous_response_id"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "send instructions and input"),
])
def test_bad_input_is_a_400_naming_the_responses_field(body: dict[str, Any], param: str, says: str) -> None:
    assert says in refused(param, **body).message


def test_auto_tools_on_a_model_without_a_parser_are_refused_and_with_one_read_by_it() -> None:
    assert refused("tool_choice", tools=[WEATHER]).code == "tool_parser_missing"
    parsed = ModelConfig(name="m", source="x", port=1, tool_parser="hermes")
    assert planned(parsed, tools=[WEATHER]).chat.tools == protocol.ToolUse("auto")


def test_the_chat_messages_of_items_keep_text_parts_whole() -> None:
    items = input_items([{"role": "developer", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}])
    assert chat_messages(None, items) == [{"role": "developer", "content": "ab"}]


def test_an_assistants_earlier_refusal_is_its_text_in_the_conversation() -> None:
    items = input_items([{"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "I can't."}]},
                         {"role": "user", "content": "why?"}])
    assert chat_messages(None, items) == [{"role": "assistant", "content": "I can't."}, {"role": "user", "content": "why?"}]


@pytest.mark.parametrize(("body", "path"), [
    ({"include": ["message.output_text.logprobs", "everything"]}, "$.include[1]"),
    ({"truncation": "middle"}, "$.truncation"),
    ({"top_logprobs": 21}, "$.top_logprobs"),
    ({"background": "yes"}, "$.background"),
])
def test_a_known_field_of_the_wrong_value_is_refused_by_the_schema_naming_it(body: dict[str, Any], path: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=re.escape(f"at `{path}`")):
        request(**body)


def test_every_include_of_openais_is_accepted_and_only_the_output_texts_logprobs_asks_for_logprobs() -> None:
    known = list(typing.get_args(Includable))
    assert planned(include=[i for i in known if i != OUTPUT_LOGPROBS], background=False).chat.logprobs is None
    assert planned(include=[OUTPUT_LOGPROBS]).chat.logprobs == 0
    assert planned(include=[OUTPUT_LOGPROBS], top_logprobs=3).chat.logprobs == 3
    assert planned(top_logprobs=2).chat.logprobs == 2  # top_logprobs alone asks for them too



def test_truncation_auto_asks_the_engine_to_leave_out_the_oldest_turns_and_disabled_does_not() -> None:
    [chat] = planned(truncation="auto").chat.prompts
    assert isinstance(chat, protocol.Chat) and chat.truncate
    for unset_or_disabled in ({}, {"truncation": "disabled"}):
        [chat] = planned(**unset_or_disabled).chat.prompts
        assert isinstance(chat, protocol.Chat) and not chat.truncate


def test_the_kept_conversation_drops_the_output_texts_logprobs_and_nothing_else() -> None:
    item = {"type": "message", "id": "msg_1", "role": "assistant",
            "content": [{"type": "output_text", "text": "hi", "annotations": [], "logprobs": [{"token": "hi"}]}]}
    assert without_logprobs(item) == {"type": "message", "id": "msg_1", "role": "assistant",
                                      "content": [{"type": "output_text", "text": "hi", "annotations": []}]}
    call = {"type": "function_call", "id": "fc_1", "call_id": "c", "name": "f", "arguments": "{}"}
    assert without_logprobs(dict(call)) == call
