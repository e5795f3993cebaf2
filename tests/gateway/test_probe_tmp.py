import httpx
from fleets import FakeFleets

T = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
CASES = [
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "r"}], "tools": T},
    {"messages": [{"role": "tool", "tool_call_id": "zz", "content": "r"}], "tools": T},
    {"messages": [{"role": "tool", "content": "r"}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]},
    {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f"}}]}]},
    {"messages": [{"role": "assistant", "tool_calls": []}]},
    {"messages": [{"role": "assistant", "refusal": "no", "content": None}, {"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"messages": [{"role": "user", "content": "hi", "name": 5}]},
    {"messages": [{"role": "function", "name": "f", "content": "r"}]},
    {"messages": [{"role": "user", "content": "hi"}], "tools": T, "tool_choice": {"type": "function", "function": {"name": "g"}}},
    {"messages": [{"role": "user", "content": "hi"}], "tools": T, "tool_choice": {"type": "function"}},
    {"messages": [{"role": "user", "content": "hi"}], "tools": T, "tool_choice": "sometimes"},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}}], "tool_choice": "required"},
    {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "custom", "custom": {"name": "x"}}]},
    {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
    {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "pattern": "(unclosed"}}}},
    {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}}},
    {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"regex": "(unclosed"}},
    {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"grammar": "not a grammar ::= ="}},
    {"messages": [{"role": "user", "content": "hi"}], "structured_outputs": {"choice": []}},
]


def test_probe(fake_fleet: FakeFleets) -> None:
    f = fake_fleet({"name": "m", "tool_parser": "hermes"})
    for c in CASES:
        r = httpx.post(f"{f.url}/v1/chat/completions", json={"model": "m", "max_tokens": 2, **c}, timeout=10)
        print(r.status_code, str(c)[:100], "->", r.text[:220] if r.status_code != 200 else "ok")
