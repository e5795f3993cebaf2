"""An answer read apart, on the engine: its reasoning, its content and its tool calls.

The gateway asks (`GenerateRequest.reasoning`, `.tools`); the engine reads, since vLLM's parsers
need the model's tokenizer and vLLM itself (the gateway never imports either). Per choice, one
`Reader` takes the answer as it comes (`step`, one output step's new text and token ids) or whole
(`whole`, a request nobody streams), and gives back content, reasoning and tool-call pieces:

1. reasoning first: the model's reasoning parser (`reasoning_parser` in fleet.toml, vLLM's by
   name) splits what the model thought from what it answers; tool calls are read from the answer
   alone;
2. then tool calls, by the request's `ToolUse`: `auto`, the model's tool parser (`tool_parser`,
   vLLM's by name) finds calls in the model's own format; `named`, the whole answer is the
   function's arguments (constrained by its schema on the gateway's side); `required`, the answer
   is a JSON array of {"name", "parameters"} objects (constrained likewise), read by
   `RequiredCalls` as it streams.

vLLM's parser classes come from its registries (`ToolParserManager`, `ReasoningParserManager`),
found where this vLLM keeps them (0.24 and later).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.wire import protocol


def call_id() -> str:
    """A tool call's id, as OpenAI's look: "call_" and 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


def tool_parser_class(name: str) -> Any:
    """vLLM's tool parser class registered as `name` (KeyError: none is)."""
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError:  # vLLM before 0.25
        from vllm.entrypoints.openai.tool_parsers import ToolParserManager
    return ToolParserManager.get_tool_parser(name)


def reasoning_parser_class(name: str) -> Any:
    """vLLM's reasoning parser class registered as `name` (KeyError: none is)."""
    from vllm.reasoning import ReasoningParserManager

    return ReasoningParserManager.get_reasoning_parser(name)


def vllm_request(chat: protocol.Chat | None, tool_choice: str) -> Any:
    """The request object vLLM's parsers read (they look at its tools and settings), built from
    what the gateway sent."""
    try:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    except ImportError:  # vLLM before 0.25
        from vllm.entrypoints.openai.protocol import ChatCompletionRequest
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                "parameters": json.loads(t.parameters) if t.parameters else None}}
             for t in (chat.tools or [])] if chat else []
    return ChatCompletionRequest(model="fleet", messages=[{"role": "user", "content": ""}],
                                 tools=tools or None, tool_choice=tool_choice if tools else "none")


@dataclass
class Piece:
    """What one step (or the whole answer) gave: content, reasoning, tool-call pieces."""

    content: str = ""
    reasoning: str = ""
    calls: list[protocol.ToolCallDelta] = field(default_factory=list)


class RequiredCalls:
    """Tool calls read from a JSON array of {"name": ..., "parameters": {...}} objects as its text
    arrives: each call's id and name as soon as its name is whole, then its parameters' text as it
    comes (a call's `arguments`). The text is valid JSON of that shape (structured outputs made it
    so); keys may come in either order, as the schema does not fix one."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.calls = -1  # the index of the call being read
        self.key: str | None = None  # the key of the element's value being read (depth 2)
        self.token = ""  # a string at depth 2 being read (a key or the name)
        self.expect_value = False
        self.name_sent = False
        self.pending_args = ""  # parameters that came before the name (then sent with it)
        self.params_depth = 0  # > 0 while inside the parameters' value

    def feed(self, text: str) -> list[protocol.ToolCallDelta]:
        out: list[protocol.ToolCallDelta] = []
        args = ""

        def flush_args() -> None:
            nonlocal args
            if not args:
                return
            if self.name_sent:
                out.append(protocol.ToolCallDelta(self.calls, arguments=args))
            else:
                self.pending_args += args
            args = ""

        for ch in text:
            if self.params_depth:  # inside the parameters' value: its text is the arguments
                args += ch
                if self.in_string:
                    if self.escaped:
                        self.escaped = False
                    elif ch == "\\":
                        self.escaped = True
                    elif ch == '"':
                        self.in_string = False
                elif ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.params_depth += 1
                elif ch in "}]":
                    self.params_depth -= 1
                    if not self.params_depth:
                        self.key = None
                continue
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                    self.token += ch
                elif ch == "\\":
                    self.escaped = True
                    self.token += ch
                elif ch == '"':
                    self.in_string = False
                    self._string_done(out)
                else:
                    self.token += ch
                continue
            if ch == '"':
                self.in_string, self.token = True, ""
            elif ch == "[" and self.depth == 0:
                self.depth = 1
            elif ch == "{" and self.depth == 1:
                self.depth, self.calls, self.key, self.name_sent, self.pending_args = 2, self.calls + 1, None, False, ""
            elif ch == "}" and self.depth == 2:
                self.depth = 1
            elif ch == ":" and self.depth == 2:
                self.expect_value = True
            elif self.depth == 2 and self.expect_value and self.key == "parameters" and ch in "{[":
                self.expect_value, self.params_depth = False, 1
                args += ch
            elif ch == "," and self.depth == 2:
                self.key = None
            flush_args()
        flush_args()
        return out

    def _string_done(self, out: list[protocol.ToolCallDelta]) -> None:
        if self.depth != 2:
            return
        if not self.expect_value:  # a key
            self.key = json.loads(f'"{self.token}"')
            return
        self.expect_value = False
        if self.key == "name":
            out.append(protocol.ToolCallDelta(self.calls, call_id(), json.loads(f'"{self.token}"'), self.pending_args))
            self.name_sent, self.pending_args = True, ""


def required_calls(text: str) -> list[protocol.ToolCallDelta]:
    """The calls of a whole answer to tool_choice "required": a JSON array of {"name", "parameters"}."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if isinstance(items, dict):
        items = [items]
    return [protocol.ToolCallDelta(k, call_id(), item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
            for k, item in enumerate(items if isinstance(items, list) else [])
            if isinstance(item, dict) and isinstance(item.get("name"), str)]


class Reader:
    """One choice's answer read apart as it comes (or whole)."""

    def __init__(self, tools: protocol.ToolUse | None, tool_parser: Any, reasoning_parser: Any, request: Any) -> None:
        self.tools = tools
        self.tool_parser = tool_parser if tools is not None and tools.mode == "auto" else None
        self.reasoning_parser = reasoning_parser
        self.request = request
        self.required = RequiredCalls() if tools is not None and tools.mode == "required" else None
        self.named_id: str | None = None
        self.text, self.ids = "", list[int]()  # the whole answer so far (the reasoning parser reads these)
        self.content, self.content_ids = "", list[int]()  # the answer's content so far (the tool parser reads these)
        self.reasoning_done = reasoning_parser is None
        self.reasoning_tokens = 0  # of the answer's tokens, those of its reasoning

    def step(self, delta_text: str, delta_ids: Sequence[int]) -> Piece:
        """One output step's new text and token ids."""
        piece = Piece()
        content, content_ids = delta_text, list(delta_ids)
        if not self.reasoning_done:
            previous_text, previous_ids = self.text, self.ids
            self.text, self.ids = self.text + delta_text, self.ids + list(delta_ids)
            message = self.reasoning_parser.extract_reasoning_streaming(
                previous_text, self.text, delta_text, previous_ids, self.ids, list(delta_ids))
            piece.reasoning = _reasoning_of(message)
            content = (message.content or "") if message is not None else ""
            if self.reasoning_parser.is_reasoning_end(self.ids):
                self.reasoning_done = True
                content_ids = self.reasoning_parser.extract_content_ids(list(delta_ids)) if content else []
            else:
                content_ids = []
            self.reasoning_tokens += len(delta_ids) - len(content_ids)
        if not content and not content_ids:
            return piece
        previous, previous_ids = self.content, self.content_ids
        self.content, self.content_ids = self.content + content, self.content_ids + content_ids
        if self.tools is None:
            piece.content = content
        elif self.tools.mode == "named":
            first = self.named_id is None
            if first:
                self.named_id = call_id()
            piece.calls = [protocol.ToolCallDelta(0, self.named_id if first else None, self.tools.name if first else None,
                                                  content)]
        elif self.required is not None:
            piece.calls = self.required.feed(content)
        elif self.tool_parser is not None:
            message = self.tool_parser.extract_tool_calls_streaming(
                previous, self.content, content, previous_ids, self.content_ids, content_ids, self.request)
            if message is not None:
                piece.content = message.content or ""
                piece.calls = [_call_delta(d) for d in message.tool_calls or []]
        else:
            piece.content = content
        return piece

    def whole(self, text: str, ids: Sequence[int] = ()) -> Piece:
        """A whole answer (a request nobody streams): its reasoning, content and calls at once."""
        piece = Piece(content=text)
        if self.reasoning_parser is not None:
            reasoning, content = self.reasoning_parser.extract_reasoning(text, self.request)
            piece.reasoning, piece.content = reasoning or "", content or ""
            self.reasoning_tokens = reasoning_token_count(self.reasoning_parser, list(ids)) if piece.reasoning else 0
        if self.tools is None:
            return piece
        content, piece.content = piece.content, ""
        if self.tools.mode == "named":
            piece.calls = [protocol.ToolCallDelta(0, call_id(), self.tools.name, content)]
        elif self.tools.mode == "required":
            piece.calls = required_calls(content)
        elif self.tool_parser is not None:
            found = self.tool_parser.extract_tool_calls(content, self.request)
            piece.content = found.content or ""
            if found.tools_called:
                piece.calls = [protocol.ToolCallDelta(k, c.id or call_id(), c.function.name, c.function.arguments)
                               for k, c in enumerate(found.tool_calls)]
        else:
            piece.content = content
        return piece


def reasoning_token_count(parser: Any, ids: list[int]) -> int:
    """How many of a whole answer's tokens are its reasoning: the parser's own count where it has
    one, else those up to its end-of-reasoning token (all of them if it never came)."""
    counted = parser.count_reasoning_tokens(ids) if hasattr(parser, "count_reasoning_tokens") else 0
    if counted:
        return int(counted)
    end = getattr(parser, "end_token_id", None)
    return ids.index(end) + 1 if end in ids else len(ids)


def _reasoning_of(message: Any) -> str:
    if message is None:
        return ""
    return getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None) or ""


def _call_delta(d: Any) -> protocol.ToolCallDelta:
    function = getattr(d, "function", None)
    return protocol.ToolCallDelta(d.index, getattr(d, "id", None), getattr(function, "name", None) if function else None,
                                  (getattr(function, "arguments", None) or "") if function else "")


class Parsers:
    """This engine's parsers: the model's tool parser and reasoning parser classes (fleet.toml's
    `tool_parser`, `reasoning_parser`), and a `Reader` per choice of a request that asks."""

    def __init__(self, tokenizer: Any, tool_parser: str | None, reasoning_parser: str | None) -> None:
        self.tokenizer = tokenizer
        self.tool_parser = tool_parser_class(tool_parser) if tool_parser else None
        self.reasoning_parser = reasoning_parser_class(reasoning_parser) if reasoning_parser else None
        if self.tool_parser is not None:
            self._tool_parser(None)  # a parser that cannot work with this tokenizer fails the start, not a request

    def _tool_parser(self, request: Any) -> Any:
        assert self.tool_parser is not None
        tools = getattr(request, "tools", None) or []
        try:
            return self.tool_parser(self.tokenizer, tools)
        except TypeError:  # vLLM before 0.25: the tokenizer alone
            return self.tool_parser(self.tokenizer)

    def _auto(self, req: protocol.GenerateRequest) -> bool:
        """The model's tool parser finds the calls in this answer (tool_choice "auto")."""
        return req.tools is not None and req.tools.mode == "auto" and self.tool_parser is not None

    def request(self, req: protocol.GenerateRequest) -> Any:
        """The request object vLLM's parsers read, adjusted by them (None: none of them reads this
        answer; a named or "required" call is read by fleet's own reader, which needs no such object,
        and building one, a pydantic model of vLLM's, costs ~20 us a request)."""
        if not (self._auto(req) or (req.reasoning and self.reasoning_parser is not None)):
            return None
        chat = req.prompt if isinstance(req.prompt, protocol.Chat) else None
        request = vllm_request(chat, "auto" if req.tools is not None and req.tools.mode == "auto" else "none")
        if self._auto(req):
            request = self._tool_parser(request).adjust_request(request)
        return request

    def reader(self, req: protocol.GenerateRequest, request: Any) -> Reader | None:
        """A new reader for one choice of `req`, given what `request(req)` made (None: its answer is
        read as it is)."""
        reasoning = self.reasoning_parser(self.tokenizer) if req.reasoning and self.reasoning_parser else None
        if req.tools is None and reasoning is None:
            return None
        return Reader(req.tools, self._tool_parser(request) if self._auto(req) else None, reasoning, request)
