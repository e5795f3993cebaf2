"""Request bodies before any model sees them (fleet.gateway.bodies): read under the size limit
(BodyTooLarge, a 413, beyond it), decoded straight into the route's schema, and every way a body
can be wrong a 400 that names the field; the methods the generation routes answer; and how a
streamed answer's body is sent (fleet.wire.asgi.send_chunks, both servers' hot routes).

Bodies go through the real app with no models (`create_app({})`): a body that decodes is a 404.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from litestar.testing import TestClient

from fleet.errors import BodyTooLarge
from fleet.gateway.app import create_app
from fleet.wire.asgi import LastChunk, read_body, send_chunks

# --- decoding the request body --------------------------------------------------------------


class DecodeError:
    """The OpenAI error a body got from the gateway (decoded by Litestar + msgspec, before routing)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.param = body["error"]["param"]
        self.message = body["error"]["message"]


def post_body(body: bytes, path: str = "/v1/completions") -> tuple[int, dict[str, Any]]:
    with TestClient(create_app({}), base_url="http://127.0.0.1") as client:  # no models: a body that decodes is a 404
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    return r.status_code, r.json()


def decode_error(body: bytes, path: str = "/v1/completions") -> DecodeError:
    status, payload = post_body(body, path)
    assert status == 400, payload
    return DecodeError(status, payload)


def test_decode_wrong_type_names_the_field() -> None:
    err = decode_error(b'{"model": "m", "prompt": "x", "max_tokens": "ten"}')
    assert err.param == "max_tokens"
    assert "Expected `int | null`, got `str`" in err.message


def test_decode_wrong_type_names_a_nested_field() -> None:
    err = decode_error(b'{"model": "m", "prompt": "x", "stream": true, "stream_options": {"include_usage": 3}}')
    assert err.param == "stream_options.include_usage"


def test_decode_out_of_range_names_the_field() -> None:
    assert decode_error(b'{"model": "m", "prompt": "x", "max_tokens": 0}').param == "max_tokens"
    assert decode_error(b'{"model": "m", "prompt": "x", "temperature": -1}').param == "temperature"
    assert decode_error(b'{"model": "m", "prompt": "x", "n": 0}').param == "n"


def test_decode_a_wrong_key_names_the_object_that_holds_it() -> None:
    err = decode_error(b'{"model": "m", "input": "x", "metadata": {"' + b"k" * 65 + b'": "v"}}', "/v1/responses")
    assert err.param == "metadata"
    assert err.message == "invalid request: a key: Expected `str` of length <= 64 (at `metadata`)"


def test_decode_malformed_json_is_a_400_naming_no_field() -> None:
    err = decode_error(b'{"model": "m", "prompt": ')
    assert err.param is None
    assert "not valid JSON" in err.message


def test_decode_missing_model_names_model() -> None:
    err = decode_error(b'{"prompt": "x"}')
    assert err.param == "model"
    assert "missing required field `model`" in err.message


def test_decode_missing_prompt_names_prompt() -> None:
    assert decode_error(b'{"model": "m"}').param == "prompt"


def test_decode_a_body_that_is_not_an_object_is_a_400_naming_no_field() -> None:
    err = decode_error(b'["model"]')
    assert err.param is None
    assert "Expected `object`" in err.message


def test_decode_missing_nested_field_names_that_field() -> None:
    err = decode_error(b'{"model": "m", "messages": [{"content": "hi"}]}', "/v1/chat/completions")
    assert err.param == "messages[0].role"
    assert "missing required field `role` (at `messages[0].role`)" in err.message


def test_decode_reads_numbers_sent_as_strings_but_not_booleans_as_numbers() -> None:
    """Lax like pydantic-based servers (vLLM, OpenAI's): "3" is 3; true is not a number."""
    status, payload = post_body(b'{"model": "m", "prompt": "x", "max_tokens": "3", "temperature": "0.5"}')
    assert status == 404 and payload["error"]["code"] == "model_not_found"  # decoded, then routed
    assert decode_error(b'{"model": "m", "prompt": "x", "max_tokens": true}').param == "max_tokens"


def test_decode_whitespace_only_body_is_empty() -> None:
    assert "body is empty" in decode_error(b" \r\n ").message


def test_decode_reports_bad_json_before_a_missing_field() -> None:
    """Typed decoding meets the missing field first; the body is still reported as not JSON."""
    err = decode_error(b'{"model": "m", "prompt": "x"} trailing', "/v1/chat/completions")
    assert err.param is None and "not valid JSON" in err.message


def test_decode_ignores_unknown_fields() -> None:
    status, payload = post_body(b'{"model": "m", "prompt": "x", "store": true, "parallel_tool_calls": false}')
    assert status == 404 and payload["error"]["code"] == "model_not_found"  # decoded, then routed


def test_early_stopping_other_string_is_refused_when_decoding() -> None:
    assert decode_error(b'{"model": "m", "prompt": "x", "early_stopping": "sometimes"}').param == "early_stopping"


# --- reading the body under the size limit --------------------------------------------------


def read(messages: list[dict[str, Any]], limit: int, headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """`read_body` over ASGI messages handed out one by one, as a server delivers a chunked body."""
    pending = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(pending)

    return asyncio.run(read_body({"headers": headers or []}, receive, limit))  # type: ignore[arg-type]


def test_read_body_joins_the_pieces_of_a_chunked_body() -> None:
    pieces = [{"type": "http.request", "body": part, "more_body": True} for part in (b'{"a"', b": ", b"1")]
    assert read([*pieces, {"type": "http.request", "body": b"}", "more_body": False}], 100) == b'{"a": 1}'


def test_read_body_stops_at_the_limit_declared_or_sent() -> None:
    with pytest.raises(BodyTooLarge):
        read([{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 2, 100)
    with pytest.raises(BodyTooLarge):
        read([{"type": "http.request", "body": b"x" * 101}], 100)
    with pytest.raises(BodyTooLarge):  # refused before any byte is read
        read([], 100, [(b"content-length", b"101")])
    assert read([{"type": "http.request", "body": b"x" * 100}], 100) == b"x" * 100


# --- sending a streamed answer ------------------------------------------------------------------


def sent(chunks: list[bytes], on_first: Any = None) -> list[tuple[bytes, bool]]:
    """The (body, more_body) messages `send_chunks` gives the server for `chunks`; the source fails
    if it is read past its chunks' end."""
    messages: list[tuple[bytes, bool]] = []

    async def source() -> Any:
        for chunk in chunks:
            yield chunk
        if chunks and type(chunks[-1]) is LastChunk:
            raise AssertionError("read past the answer's last chunk")

    async def send(message: dict[str, Any]) -> None:
        messages.append((message["body"], message["more_body"]))

    async def main() -> None:
        it = source()
        try:
            await send_chunks(it, send, on_first)
        finally:
            await it.aclose()

    asyncio.run(main())
    return messages


def test_the_last_chunk_carries_the_end_of_the_body_and_nothing_is_read_after_it() -> None:
    assert sent([b"a", LastChunk(b"b")]) == [(b"a", True), (b"b", False)]


def test_the_body_ends_by_itself_when_the_chunks_end_unmarked() -> None:
    assert sent([b"a", b"b"]) == [(b"a", True), (b"b", True), (b"", False)]
    assert sent([]) == [(b"", False)]


def test_on_first_is_called_once_as_the_first_chunk_leaves() -> None:
    calls: list[int] = []
    assert len(sent([b"a", b"b", LastChunk(b"c")], lambda: calls.append(1))) == 3
    assert calls == [1]


# --- methods ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generation_routes_answer_options_and_refuse_other_methods(path: str) -> None:
    with TestClient(create_app({}), base_url="http://127.0.0.1") as client:
        options = client.options(path)
        assert options.status_code == 204 and set(options.headers["allow"].split(", ")) == {"OPTIONS", "POST"}
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = client.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == "POST, OPTIONS", (method, r.text)
            assert r.json()["error"]["message"] == "Method Not Allowed"
