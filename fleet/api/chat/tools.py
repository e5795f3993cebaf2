"""A chat request's tools: their rules, and how the engine is to read calls out of the answer.

- `tools` are function tools: names unique and of OpenAI's form, parameters a JSON Schema;
- `tool_choice` "none" (the model sees the tools, the answer is read as text), "auto" (the model's
  tool parser, vLLM's, finds calls in its own format: the model needs `tool_parser` in fleet.toml),
  "required" or a named function: structured outputs make the answer a JSON array of
  {"name", "parameters"} objects, or the named function's arguments, so the calls always parse and
  match their schemas, on any model;
- `parallel_tool_calls` false: "required" makes one call at most.

A forced named function answers `finish_reason` "stop" (as OpenAI does); a call made under
"auto" or "required", "tool_calls".
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import msgspec

from fleet.api.chat.protocol import ChatTool, NamedToolChoice, ResponseFormat, ToolChoice
from fleet.api.rules import check_schema_size
from fleet.errors import InvalidRequest, shown
from fleet.wire import protocol

FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
_json = msgspec.json.Encoder()
# Schemas that passed check_schema, by digest: an agent sends the same tools with every call, and
# jsonschema's check of its meta-schema costs ~0.5 ms a schema (more than the rest of the request's
# way through the gateway). Bounded, oldest out; a digest, not the schema, so a big one costs 16 bytes.
CHECKED_SCHEMAS = 4096
_checked: OrderedDict[bytes, None] = OrderedDict()


@dataclass(frozen=True)
class Tools:
    """What a request's tools come to: the tools the template renders, how the engine reads calls
    (None: it does not), and the schema structured outputs hold the answer to (JSON text)."""

    rendered: list[protocol.Tool] | None
    use: protocol.ToolUse | None
    schema: str | None
    schema_param: str = "tools"  # the field the schema comes from: the engine's refusal of it names it


NO_TOOLS = Tools(None, None, None)


def check_tools(tools: list[ChatTool]) -> None:
    """Function names of OpenAI's form, each once; parameters a JSON Schema (a 400 naming the field)."""
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not FUNCTION_NAME.match(name):
            raise InvalidRequest(f"a function's name is 1 to 64 letters, digits, '_' or '-', got {shown(name)}",
                                 param=f"tools[{i}].function.name")
        if name in seen:
            raise InvalidRequest(f"two tools are named {name!r}", param=f"tools[{i}].function.name")
        seen.add(name)
        if tool.function.parameters is not None:
            check_schema(tool.function.parameters, f"tools[{i}].function.parameters")


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A JSON Schema that validates as one (jsonschema's check of its own meta-schema), within
    rules.SCHEMA_DEPTH and SCHEMA_PROPERTIES; one seen valid lately (the same JSON text) is not checked again.
    (The body's decoder already bounds its nesting below what encoding it for the digest allows.)"""
    digest = hashlib.blake2b(_json.encode(schema), digest_size=16).digest()
    if digest in _checked:
        _checked.move_to_end(digest)
        return
    check_schema_size(schema, param)
    import jsonschema

    try:
        check_against_meta_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(map(str, e.absolute_path)) or "its root"
        raise InvalidRequest(f"not a JSON Schema: {e.message} (at {where})", param=param) from None
    _checked[digest] = None
    if len(_checked) > CHECKED_SCHEMAS:
        _checked.popitem(last=False)


def check_against_meta_schema(schema: dict[str, Any]) -> None:
    """jsonschema's check of a schema against its draft's meta-schema (raises SchemaError)."""
    import jsonschema

    jsonschema.validators.validator_for(schema).check_schema(schema)


def tools_of(tools: list[ChatTool] | None, choice: ToolChoice | None, parallel: bool | None,
             response_format: ResponseFormat | None, tool_parser: str | None, model: str) -> Tools:
    """Check the tools and the choice; what the engine and structured outputs are told."""
    if not tools:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return NO_TOOLS
    check_tools(tools)
    rendered = [protocol.Tool(t.function.name, t.function.description,
                              _json.encode(t.function.parameters).decode() if t.function.parameters is not None else None)
                for t in tools]
    choice = "auto" if choice is None else choice
    if choice == "none":
        return Tools(rendered, None, None)
    if choice == "auto":
        if tool_parser is None:
            raise InvalidRequest(
                f'tool_choice "auto" needs the model\'s tool parser: model {model!r} has none. Set tool_parser in its '
                '[[models]] table (vLLM\'s name for its format: hermes, llama3_json, mistral, qwen3_xml, ...), or '
                'send tool_choice "required" or a named function, which any model can follow',
                param="tool_choice", code="tool_parser_missing")
        return Tools(rendered, protocol.ToolUse("auto"), None)
    if response_format is not None and response_format.type != "text":
        raise InvalidRequest('response_format cannot be used with tool_choice "required" or a named function: the '
                             "answer is the tool calls' arguments", param="response_format")
    if isinstance(choice, NamedToolChoice):
        i = next((k for k, t in enumerate(tools) if t.function.name == choice.function.name), None)
        if i is None:
            raise InvalidRequest(f"tool_choice names {shown(choice.function.name)}, which is not one of the tools",
                                 param="tool_choice")
        schema = parameters_schema(tools[i])
        return Tools(rendered, protocol.ToolUse("named", tools[i].function.name), _json.encode(schema).decode(),
                     f"tools[{i}].function.parameters")
    return Tools(rendered, protocol.ToolUse("required"), _json.encode(required_schema(tools, parallel)).decode())


def parameters_schema(tool: ChatTool) -> dict[str, Any]:
    """A function's arguments: its parameters' schema, or any JSON object where it has none."""
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_schema(tools: list[ChatTool], parallel: bool | None) -> dict[str, Any]:
    """tool_choice "required": a JSON array of at least one {"name", "parameters"} object, each the
    name of a tool and its arguments (at most one with parallel_tool_calls false). Each tool's own
    `$defs` move to the array's, where its references find them (as vLLM does)."""
    variants: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for i, tool in enumerate(tools):
        params = dict(parameters_schema(tool))
        for name, definition in (params.pop("$defs", None) or {}).items():
            if name in defs and defs[name] != definition:
                raise InvalidRequest(f"two tools define $defs/{name} differently", param=f"tools[{i}].function.parameters")
            defs[name] = definition
        variants.append({"properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if parallel is False:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema
