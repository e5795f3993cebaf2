"""A conversation as the model's chat template renders it: messages and tools in Hugging Face's
convention (as vLLM renders them), through the tokenizer's template engine."""

from __future__ import annotations

import json
from typing import Any

from fleet.errors import InvalidRequest
from fleet.wire import protocol


def render_chat(tokenizer: Any, template: str | None, model: str, chat: protocol.Chat) -> str:
    """The conversation as prompt text; a 400 naming `messages` where the model has no template or
    its template rejects these messages."""
    if template is None:
        raise InvalidRequest(
            f"model {model!r} has no chat template; set chat_template in fleet.toml or use /v1/completions",
            param="messages",
        )
    try:
        text: str = tokenizer.apply_chat_template(
            [template_message(m) for m in chat.messages],
            chat_template=template,
            tools=[template_tool(t) for t in chat.tools] if chat.tools else None,
            tokenize=False,
            add_generation_prompt=chat.add_generation_prompt and not chat.continue_final_message,
            continue_final_message=chat.continue_final_message,
        )
    except Exception as e:  # a template that rejects these messages
        raise InvalidRequest(f"the chat template cannot render these messages: {e}", param="messages") from None
    return text


def template_message(m: protocol.ChatMessage) -> dict[str, Any]:
    """One message as chat templates read it (Hugging Face's convention, as vLLM renders them): an
    assistant's tool calls with their arguments as objects, a tool's answer with its call's id."""
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                 for c in m.tool_calls]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        message["name"] = m.name
    return message


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_tool(t: protocol.Tool) -> dict[str, Any]:
    """A tool as chat templates read it (OpenAI's function tool)."""
    function: dict[str, Any] = {"name": t.name}
    if t.description is not None:
        function["description"] = t.description
    function["parameters"] = json.loads(t.parameters) if t.parameters else {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def turn_starts(messages: list[protocol.ChatMessage]) -> list[int]:
    """Where a conversation may be cut to fit the context (the Responses API's truncation "auto"):
    at each user message after the first, so that an assistant's tool calls and the tool answers
    to them stay together and the kept part opens with a user's turn."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    return users[1:]


def cut_at(messages: list[protocol.ChatMessage], start: int) -> list[protocol.ChatMessage]:
    """The conversation from message `start` on, keeping the system and developer messages
    before it (the instructions stay)."""
    return [m for m in messages[:start] if m.role in ("system", "developer")] + messages[start:]
