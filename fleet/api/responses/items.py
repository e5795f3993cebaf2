"""A Responses request's input and tools, read and checked, and the conversation they make as
chat messages (what the engine's chat template renders): the Responses API runs on the same
chat machinery as /v1/chat/completions (its tools, structured outputs, reasoning), as LiteLLM's
translation does, with its own shapes on either side.

- `input_items`: the input (a string, or a list of items) as items in OpenAI's shape, each with an
  id (they are stored, and listed by /v1/responses/{id}/input_items): messages (user, system,
  developer, assistant; text content, an assistant's earlier refusal as its text), function calls and their outputs, reasoning items (kept,
  never rendered: the model's earlier thoughts are not its input). Anything else is a 400 naming
  the item.
- `chat_messages`: instructions, then the conversation so far (a previous response's transcript)
  and this input, as chat messages: function calls join the assistant message before them, a
  function call's output is a tool message answering its `call_id`.
- `chat_tools`: function tools as chat's; a built-in tool (web_search, file_search, ...) is a 400
  naming it.
"""

from __future__ import annotations

import secrets
from typing import Any

from fleet.api.responses.protocol import FunctionTool
from fleet.errors import InvalidRequest, shown

ROLES = ("user", "system", "developer", "assistant")


def item_id(prefix: str) -> str:
    """An id as OpenAI writes a Responses object's: its kind, "_", 32 hex digits (resp_..., msg_..., fc_...)."""
    return f"{prefix}_{secrets.token_hex(16)}"


TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "refusal": "refusal"}  # its text's key


def _text(content: Any, where: str) -> str:
    """A message's content or a call's output as text: a string, or text parts (an assistant's
    earlier refusal, as the Agents SDK sends it back, is its text)."""
    if isinstance(content, str):
        return content
    field = where.rsplit(".", 1)[-1]
    if not isinstance(content, list):
        raise InvalidRequest(f"{field} is a string or a list of text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise InvalidRequest(f"only text content parts are supported ({', '.join(TEXT_PARTS)}), got "
                                 f"{shown(str(kind))}", param=f"{where}[{j}].type")
        if not isinstance(part.get(key), str):
            raise InvalidRequest(f"the {kind} part's {key} is a string", param=f"{where}[{j}].{key}")
        texts.append(part[key])
    return "".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{key} is a string", param=f"{where}.{key}")
    return value


def input_items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as items in OpenAI's shape, each with an id."""
    if isinstance(given, str):
        return [{"id": item_id("msg"), "type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": given}]}]
    if not given:
        raise InvalidRequest("input must not be an empty list", param="input")
    out = []
    for i, raw in enumerate(given):
        where = f"input[{i}]"
        kind = raw.get("type") or ("message" if "role" in raw else None)
        if kind == "message":
            role = raw.get("role")
            if role not in ROLES:
                raise InvalidRequest(f"a message's role is one of {', '.join(ROLES)}", param=f"{where}.role")
            part = "output_text" if role == "assistant" else "input_text"
            text = _text(raw.get("content"), f"{where}.content")
            out.append({"id": raw.get("id") or item_id("msg"), "type": "message", "role": role,
                        "content": [{"type": part, "text": text}]})
        elif kind == "function_call":
            out.append({"id": raw.get("id") or item_id("fc"), "type": "function_call",
                        "call_id": _string(raw, "call_id", where), "name": _string(raw, "name", where),
                        "arguments": _string(raw, "arguments", where), "status": "completed"})
        elif kind == "function_call_output":
            output = raw.get("output")
            out.append({"id": raw.get("id") or item_id("fco"), "type": "function_call_output",
                        "call_id": _string(raw, "call_id", where), "status": "completed",
                        "output": _text(output, f"{where}.output") if output is not None else ""})
        elif kind == "reasoning":
            out.append({**raw, "id": raw.get("id") or item_id("rs")})
        else:
            raise InvalidRequest(f"input items of type {shown(str(kind))} are not supported (messages, function_call, "
                                 "function_call_output and reasoning items are)", param=f"{where}.type")
    return out


def check_calls(transcript: list[dict[str, Any]], items: list[dict[str, Any]]) -> None:
    """Each function call's output answers a call made before it (in the conversation so far, or
    earlier in this input): else a 400 naming its call_id."""
    called = {item["call_id"] for item in transcript if item.get("type") == "function_call"}
    for i, item in enumerate(items):
        if item["type"] == "function_call":
            called.add(item["call_id"])
        elif item["type"] == "function_call_output" and item["call_id"] not in called:
            raise InvalidRequest(f"call_id {shown(item['call_id'])} matches no function_call before it",
                                 param=f"input[{i}].call_id")


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Instructions and the conversation's items as chat messages (ChatMessageIn's shape)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append({"role": item["role"], "content": "".join(p["text"] for p in item["content"])})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_tools(tools: list[FunctionTool] | None) -> list[dict[str, Any]] | None:
    """Function tools as chat's; any other type is a built-in tool fleet cannot run."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.type != "function":
            raise InvalidRequest(f"the built-in tool {shown(tool.type)} is not available: fleet runs function tools "
                                 "only (your code runs them)", param=f"tools[{i}].type")
        if tool.name is None:
            raise InvalidRequest("a function tool needs its name", param=f"tools[{i}].name")
        function: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            function["description"] = tool.description
        if tool.parameters is not None:
            function["parameters"] = tool.parameters
        out.append({"type": "function", "function": function})
    return out
