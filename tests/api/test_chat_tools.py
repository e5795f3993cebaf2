"""A chat request's tools (fleet/api/chat/tools.py) and tool messages (api/rules.chat_messages):
the rules, what the engine is told, and the schema structured outputs hold a forced call to."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import msgspec
import pytest

from fleet.api.chat.protocol import ChatCompletionRequest
from fleet.api.chat.serving import plan_chat
from fleet.config.model import SamplingDefaults
from fleet.errors import InvalidRequest
from fleet.wire import protocol

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                            "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "weather in Paris?"}]


def chat(**body: Any) -> ChatCompletionRequest:
    return msgspec.convert({"model": "m", "messages": USER, **body}, ChatCompletionRequest, strict=False)


def planned(tool_parser: str | None = None, **body: Any) -> Any:
    return plan_chat(chat(**body), SamplingDefaults(), tool_parser=tool_parser, model="m")


def refused(param: str, tool_parser: str | None = None, **body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        planned(tool_parser, **body)
    assert e.value.param == param, e.value.message
    return e.value


def test_a_named_function_is_forced_through_its_parameters_schema_and_read_as_its_call() -> None:
    p = planned(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert p.tools == protocol.ToolUse("named", "get_weather")
    assert json.loads(p.sampling.structured.json) == WEATHER["function"]["parameters"]
    assert [t.name for t in p.prompts[0].tools] == ["get_weather", "get_time"]


def test_required_is_a_json_array_of_named_calls_each_matching_its_tools_schema() -> None:
    p = planned(tools=[WEATHER, TIME], tool_choice="required")
    assert p.tools == protocol.ToolUse("required")
    schema = json.loads(p.sampling.structured.json)
    jsonschema.validate([{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}],
                        schema)
    for wrong in ([], [{"name": "get_weather", "parameters": {}}], [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
    assert "maxItems" not in schema


def test_required_without_parallel_tool_calls_makes_one_call_at_most() -> None:
    schema = json.loads(planned(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False).sampling.structured.json)
    assert schema["maxItems"] == 1


def test_each_tools_defs_move_to_the_arrays_where_references_find_them() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"at": {"$ref": "#/$defs/place"}}, "$defs": {"place": {"type": "string"}}}}}
    schema = json.loads(planned(tools=[tool], tool_choice="required").sampling.structured.json)
    assert schema["$defs"] == {"place": {"type": "string"}}
    jsonschema.validate([{"name": "f", "parameters": {"at": "Paris"}}], schema)


def test_auto_is_the_default_with_tools_and_needs_the_models_tool_parser() -> None:
    error = refused("tool_choice", tools=[WEATHER])
    assert error.code == "tool_parser_missing" and "tool_parser" in error.message and '"required"' in error.message
    p = planned("hermes", tools=[WEATHER])
    assert p.tools == protocol.ToolUse("auto") and p.sampling.structured is None


def test_none_renders_the_tools_and_reads_no_call() -> None:
    p = planned(tools=[WEATHER], tool_choice="none")
    assert p.tools is None and [t.name for t in p.prompts[0].tools] == ["get_weather"]


@pytest.mark.parametrize(("tools", "choice", "param", "says"), [
    ([{"type": "function", "function": {"name": "bad name!"}}], "required", "tools[0].function.name", "letters"),
    ([WEATHER, WEATHER], "required", "tools[1].function.name", "two tools"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}], "required",
     "tools[0].function.parameters", "not a JSON Schema"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice", "not one of the tools"),
    (None, "required", "tool_choice", "needs tools"),
])
def test_malformed_tools_and_choices_are_a_400_naming_the_field(tools: Any, choice: Any, param: str, says: str) -> None:
    assert says in refused(param, tools=tools, tool_choice=choice).message


def nested_object(levels: int) -> dict[str, Any]:
    """A schema of `levels` objects each inside the last one's "properties", a string's schema the
    innermost: 2 * levels + 1 levels of JSON objects."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_schema_nested_deeper_than_the_bound_is_a_400_before_any_check_or_engine_sees_it() -> None:
    """jsonschema's check recursed past Python's limit at ~100 objects (a 500), and the engine's grammar
    compile time grows steeply with depth: 31 objects (63 levels) pass, 32 do not."""
    assert planned(tools=[{"type": "function", "function": {"name": "f", "parameters": nested_object(31)}}],
                   tool_choice="required").sampling.structured is not None
    for deep in (nested_object(32), nested_object(300)):
        error = refused("tools[0].function.parameters", tools=[{"type": "function", "function": {
            "name": "f", "parameters": deep}}], tool_choice="required")
        assert "deeper than 64 levels" in error.message
        error = refused("response_format.json_schema.schema",
                        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": deep}})
        assert "deeper than 64 levels" in error.message
    arrays: Any = {"type": "string"}
    for _ in range(64):  # arrays nest a level each
        arrays = {"type": "array", "items": arrays}
    refused("response_format.json_schema.schema", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": arrays}})


def test_a_schema_naming_more_properties_than_the_bound_is_a_400() -> None:
    """The engine's grammar compile grows fast with an object's optional properties (2,000: 8 s on a
    2-core VM): 512 in all pass, counted across nested objects, 513 do not."""
    def wide(n: int) -> dict[str, Any]:
        return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(n)}}

    def tool(parameters: dict[str, Any]) -> dict[str, Any]:
        return {"type": "function", "function": {"name": "f", "parameters": parameters}}

    assert planned(tools=[tool(wide(512))], tool_choice="required").sampling.structured is not None
    nested = {"type": "object", "properties": {f"o{j}": wide(32) for j in range(16)}}  # 16 + 512
    for schema in (wide(513), nested, wide(10_000)):
        assert "more than 512 properties" in refused("tools[0].function.parameters", tools=[tool(schema)],
                                                     tool_choice="required").message
    refused("response_format.json_schema.schema",
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": wide(513)}})


def test_a_built_in_tool_is_refused_by_the_schema_naming_its_type() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"tools\[0\]\.type"):
        chat(tools=[{"type": "web_search"}])


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions", "send tools"),
    ({"function_call": "auto"}, "function_call", "deprecated form of tools"),
    ({"modalities": ["text", "audio"]}, "modalities", "only text"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "only text"),
    ({"web_search_options": {}}, "web_search_options", "function tools only"),
])
def test_fields_fleet_cannot_honour_are_a_400_naming_them_not_ignored(body: dict[str, Any], param: str, says: str) -> None:
    assert says in refused(param, **body).message


def test_text_modalities_and_nulls_of_the_refused_fields_are_accepted() -> None:
    assert planned(modalities=["text"], functions=None, function_call=None, audio=None, web_search_options=None)


def test_a_forced_call_and_a_response_format_together_are_refused() -> None:
    refused("response_format", tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})


def test_tools_with_beam_search_are_refused() -> None:
    refused("tools", "hermes", tools=[WEATHER], tool_choice="required", temperature=0, use_beam_search=True, n=2)


def test_a_tool_answer_goes_to_the_engine_with_the_call_it_answers() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    p = planned(tools=[WEATHER], tool_choice="none", messages=messages)
    sent = p.prompts[0].messages
    assert sent[1] == protocol.ChatMessage("assistant", "", [protocol.ToolCall("call_1", "get_weather", '{"city": "Paris"}')])
    assert sent[2] == protocol.ChatMessage("tool", "sunny", None, "call_1")


def test_a_tool_answer_to_no_earlier_call_is_a_400_naming_its_tool_call_id() -> None:
    messages = [*USER, {"role": "tool", "tool_call_id": "call_404", "content": "sunny"}]
    assert "matches no tool call" in refused("messages[1].tool_call_id", messages=messages).message
    refused("messages[1].tool_call_id", messages=[*USER, {"role": "tool", "content": "sunny"}])


def test_a_model_with_a_reasoning_parser_reads_every_chat_apart_and_include_reasoning_false_hides_it() -> None:
    p = plan_chat(chat(), SamplingDefaults(), reasoning=True)
    assert p.reasoning and p.show_reasoning and p.tools is None
    assert not plan_chat(chat(include_reasoning=False), SamplingDefaults(), reasoning=True).show_reasoning


def count_schema_checks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The schemas checked against their meta-schema from here on (the memo of checked ones emptied)."""
    from fleet.api.chat import tools

    monkeypatch.setattr(tools, "_checked", type(tools._checked)())
    checked: list[object] = []
    real = tools.check_against_meta_schema

    def counting(schema: Any) -> None:
        checked.append(schema)
        real(schema)

    monkeypatch.setattr(tools, "check_against_meta_schema", counting)
    return checked


def test_a_tools_schema_seen_valid_is_not_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = count_schema_checks(monkeypatch)
    for _ in range(3):  # an agent's calls, each with the same tools
        planned(tools=[WEATHER, TIME], tool_choice="required")
    assert len(checked) == 2  # once per schema
    planned(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "minProperties": 1}}}],
            tool_choice="required")
    assert len(checked) == 3  # another schema is checked


def test_an_invalid_schema_is_refused_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = count_schema_checks(monkeypatch)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]
    for _ in range(2):
        assert "not a JSON Schema" in refused("tools[0].function.parameters", tools=bad, tool_choice="required").message
    assert len(checked) == 2


def test_the_memo_of_checked_schemas_keeps_the_latest(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.api.chat import tools

    checked = count_schema_checks(monkeypatch)
    monkeypatch.setattr(tools, "CHECKED_SCHEMAS", 2)
    schemas = [{"type": "object", "maxProperties": k} for k in range(3)]
    for schema in schemas:
        tools.check_schema(schema, "p")
    assert len(tools._checked) == 2
    tools.check_schema(schemas[2], "p")  # kept
    tools.check_schema(schemas[0], "p")  # the oldest, gone: checked again
    assert checked == [*schemas, schemas[0]]


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "g"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tools[1].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a+"}}, "structured_outputs.regex"),
])
def test_the_engine_is_told_which_field_asked_for_the_structure_so_that_its_refusal_names_it(
        body: dict[str, Any], param: str) -> None:
    assert planned(**body).sampling.structured.param == param
