"""A conversation as the model's chat template renders it: messages and tools in Hugging Face's
convention (as vLLM renders them), through the tokenizer's template engine; and where a
conversation too long for the context is cut (the Responses API's truncation "auto")."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec

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


def fewest_turns_left_out(chat: protocol.Chat, ids_of: Callable[[protocol.Chat], list[int]],
                          fits: Callable[[list[int]], bool]) -> list[int] | None:
    """The ids of `chat` with as few of its oldest turns left out as make them fit, or of its last
    turn alone when none does (then the context check's 400 gives its size); None when it has no
    place to cut. The whole conversation is known not to fit.

    The turns kept are found from the end: 1, 2, 4, ... of the latest, then a binary search between
    the last that fit and the first that did not. Every render is then about the context's size at
    most, where a search over the whole conversation would tokenize all of it each time: this runs
    on the engine's event loop (a 1,000,000-character conversation takes ~1-2 s to encode on a
    2-core VM; bench/truncation.py)."""
    starts = turn_starts(chat.messages)
    if not starts:
        return None

    def keeping(turns: int) -> list[int]:  # the ids with the latest `turns` turns
        return ids_of(msgspec.structs.replace(chat, messages=cut_at(chat.messages, starts[len(starts) - turns])))

    best, best_ids = 1, keeping(1)
    if not fits(best_ids):
        return best_ids
    bad = len(starts) + 1  # keeping every turn (no cut) does not fit
    turns = 2
    while turns < bad:  # gallop: 2, 4, 8, ... turns, the last try every turn there is
        tried = keeping(turns)
        if not fits(tried):
            bad = turns
            break
        best, best_ids = turns, tried
        turns = min(turns * 2, bad - 1) if turns < bad - 1 else bad
    lo, hi = best + 1, bad - 1
    while lo <= hi:  # the most turns that fit, between the last that fit and the first that did not
        mid = (lo + hi) // 2
        tried = keeping(mid)
        if fits(tried):
            best, best_ids, lo = mid, tried, mid + 1
        else:
            hi = mid - 1
    return best_ids
