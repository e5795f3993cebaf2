"""/v1/responses through the real gateway on fake engines: the Response and its typed stream
events as the openai package's own types read them, tool calls, stored responses
(previous_response_id, GET, DELETE, input_items), each API key's own, the store's bounds, and a
store that outlives a restart of the gateway."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pydantic
import pytest
from fake_engine import expected_text, token_logprob, token_text
from fleets import FakeFleets, InProcessFleet, fake_fleets
from openai.types.responses import Response, ResponseStreamEvent

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}
KEYS = ["key-a", "key-b"]
events_of = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets, tmp_path_factory: pytest.TempPathFactory) -> InProcessFleet:
    store = tmp_path_factory.mktemp("responses") / "store.sqlite3"
    return module_fake_fleet({"name": "m"}, {"name": "parsed", "tool_parser": "hermes"},
                             {"name": "thinking", "reasoning_parser": "deepseek_r1"},
                             {"name": "slow", "engine_args": {"fake_token_delay": 0.2}},
                             auth={"keys": KEYS}, responses={"store_path": str(store), "max_stored": 1000})


def client(fleet: InProcessFleet, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0, timeout=15)


@pytest.fixture(scope="module")
def sdk(fleet: InProcessFleet) -> Iterator[openai.OpenAI]:
    with client(fleet) as c:
        yield c


def raw_events(fleet: InProcessFleet, **body: Any) -> list[Any]:
    """A streamed response's events, each read as the openai package's own type."""
    with httpx.stream("POST", f"{fleet.url}/v1/responses", json={"stream": True, **body}, timeout=15,
                      headers={"Authorization": "Bearer key-a"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert "[DONE]" not in "".join(lines)
    kinds = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    events = [events_of.validate_json(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert [e.type for e in events] == kinds  # each event's `event:` line names its type
    assert [e.sequence_number for e in events] == list(range(len(events)))
    return events


def test_a_text_answer_is_a_response_with_one_message_and_usage(sdk: openai.OpenAI) -> None:
    r = sdk.responses.create(model="m", input="the quick brown fox", max_output_tokens=4, instructions="be brief")
    assert isinstance(r, Response) and r.id.startswith("resp_") and r.object == "response"
    assert r.status == "incomplete" and r.incomplete_details and r.incomplete_details.reason == "max_output_tokens"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert r.output_text == expected_text(4)
    assert r.usage and r.usage.output_tokens == 4 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "be brief" and r.max_output_tokens == 4 and r.store is True


def test_a_stream_is_the_typed_events_in_order_ending_with_the_whole_response(fleet: InProcessFleet) -> None:
    events = raw_events(fleet, model="m", input="hello there", max_output_tokens=3)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.incomplete"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == expected_text(3) == done.output_text and done.status == "incomplete"
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


CALL = {"tools": [WEATHER], "tool_choice": "required"}


@pytest.mark.parametrize(("model", "limit", "body", "statuses"), [
    ("m", 3, {}, [("message", "incomplete")]),
    ("thinking", 1, {}, [("reasoning", "incomplete"), ("message", "incomplete")]),  # cut in its reasoning: an empty message
    ("thinking", 8, {}, [("reasoning", "completed"), ("message", "completed")]),
    ("m", 2, CALL, [("function_call", "incomplete")]),
    ("m", 8, CALL, [("function_call", "completed")]),
])
def test_the_item_max_output_tokens_cuts_is_incomplete_the_same_whole_and_streamed(
        fleet: InProcessFleet, sdk: openai.OpenAI, model: str, limit: int, body: dict[str, Any],
        statuses: list[tuple[str, str]]) -> None:
    whole = sdk.responses.create(model=model, input="hello there", max_output_tokens=limit, **body)
    events = raw_events(fleet, model=model, input="hello there", max_output_tokens=limit, **body)
    streamed = events[-1].response
    done = [e.item for e in events if e.type == "response.output_item.done"]
    for output in (whole.output, streamed.output, done):
        assert [(item.type, item.status) for item in output] == statuses
    assert streamed.output_text == whole.output_text


def test_include_output_text_logprobs_gives_each_tokens_logprob_and_top_alternatives_whole_and_streamed(
    fleet: InProcessFleet, sdk: openai.OpenAI,
) -> None:
    asked = {"model": "m", "input": "hi", "max_output_tokens": 3, "include": ["message.output_text.logprobs"],
             "top_logprobs": 2}
    whole = sdk.responses.create(**asked)  # type: ignore[call-overload]
    [part] = whole.output[0].content  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs is not None
    assert [lp.token for lp in part.logprobs] == [token_text(0, k, 1) for k in range(3)]
    assert {lp.logprob for lp in part.logprobs} == {token_logprob(0)}
    assert [len(lp.top_logprobs) for lp in part.logprobs] == [2, 2, 2]  # top_logprobs of them, no more
    assert part.logprobs[0].bytes == list(token_text(0, 0, 1).encode()) and whole.top_logprobs == 2
    events = raw_events(fleet, **asked)
    streamed = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert [(lp.token, lp.logprob) for lp in streamed] == [(lp.token, lp.logprob) for lp in part.logprobs]
    assert [lp.token for lp in done.logprobs] == [lp.token for lp in part.logprobs]
    final = events[-1].response.output[0].content[0]
    assert final.logprobs is not None and [lp.token for lp in final.logprobs] == [lp.token for lp in part.logprobs]
    plain = sdk.responses.create(model="m", input="hi", max_output_tokens=2)
    assert plain.output[0].content[0].logprobs is None  # type: ignore[union-attr]  # not asked: none
    kept = sdk.responses.retrieve(whole.id).output[0].content[0]  # type: ignore[union-attr]
    assert kept.logprobs is not None and len(kept.logprobs) == 3  # the stored Response keeps them


def test_fields_fleet_cannot_honour_and_bad_values_are_400s_naming_them(fleet: InProcessFleet) -> None:
    headers = {"Authorization": "Bearer key-a"}
    for extra, param in [({"background": True}, "background"), ({"conversation": "conv_1"}, "conversation"),
                         ({"include": ["nothing"]}, "include[0]"), ({"truncation": "middle"}, "truncation")]:
        r = httpx.post(f"{fleet.url}/v1/responses", json={"model": "m", "input": "hi", **extra}, headers=headers, timeout=15)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for query, param in [("limit=many", "limit"), ("order=sideways", "order")]:
        r = httpx.get(f"{fleet.url}/v1/responses/resp_x/input_items?{query}", headers=headers, timeout=15)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{fleet.url}/v1/responses", json={"model": "m", "input": "hi", "max_output_tokens": 100},
                   headers=headers, timeout=15)  # the engine's refusal, in the Responses API's words
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens", r.text
    assert "max_output_tokens can be at most" in r.json()["error"]["message"] and "max_tokens" not in r.json()["error"]["message"]


def test_reasoning_is_a_reasoning_item_before_the_message_whole_and_through_the_sdks_stream_helper(
        sdk: openai.OpenAI) -> None:
    whole = sdk.responses.create(model="thinking", input="hello", reasoning={"effort": "low"})
    reasoning, message = whole.output
    assert reasoning.type == "reasoning" and [c.text for c in reasoning.content or []] == ["fake thought"]
    assert message.type == "message" and whole.output_text == "ok" and whole.status == "completed"
    with sdk.responses.stream(model="thinking", input="hello") as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.reasoning_text.delta"]
    assert "response.reasoning_text.done" in kinds and kinds[-1] == "response.completed"
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == "ok"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}, "auto"])
def test_a_function_call_is_a_function_call_item_whole_and_streamed(fleet: InProcessFleet, sdk: openai.OpenAI,
                                                                     choice: Any) -> None:
    model = "parsed" if choice == "auto" else "m"
    r = sdk.responses.create(model=model, input="weather?", tools=[WEATHER], tool_choice=choice)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"word": "w0"}'
    assert call.call_id == "call_fake0" and call.id.startswith("fc_") and r.status == "completed"
    events = raw_events(fleet, model=model, input="weather?", tools=[WEATHER], tool_choice=choice)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert events[-1].response.output[0].arguments == call.arguments


def test_previous_response_id_continues_the_conversation_and_input_items_lists_this_turns(sdk: openai.OpenAI) -> None:
    first = sdk.responses.create(model="m", input="one two three", max_output_tokens=2)
    second = sdk.responses.create(model="m", input="four", max_output_tokens=2, previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # the fake counts a conversation's words: the first turn and its answer come before "four"
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    items = sdk.responses.input_items.list(second.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "four")]
    assert sdk.responses.retrieve(second.id).output_text == second.output_text


def test_a_stored_response_is_its_keys_alone(fleet: InProcessFleet, sdk: openai.OpenAI) -> None:
    mine = sdk.responses.create(model="m", input="secret", max_output_tokens=2)
    with client(fleet, "key-b") as other:
        with pytest.raises(openai.NotFoundError) as e:
            other.responses.retrieve(mine.id)
        assert e.value.body["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError) as e:
            other.responses.create(model="m", input="x", previous_response_id=mine.id)
        assert e.value.body["param"] == "previous_response_id"
        with pytest.raises(openai.NotFoundError):
            other.responses.delete(mine.id)
    assert sdk.responses.retrieve(mine.id).id == mine.id


def test_delete_forgets_a_response_and_store_false_keeps_none(sdk: openai.OpenAI) -> None:
    kept = sdk.responses.create(model="m", input="x", max_output_tokens=1)
    sdk.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(kept.id)
    unkept = sdk.responses.create(model="m", input="x", max_output_tokens=1, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unkept.id)


def test_responses_are_counted_under_their_own_route(fleet: InProcessFleet, sdk: openai.OpenAI) -> None:
    sdk.responses.create(model="m", input="x", max_output_tokens=1)
    metrics = httpx.get(f"{fleet.url}/metrics", headers={"Authorization": "Bearer key-a"}).text
    assert 'fleet_requests_total{model="m",route="responses",status="200"}' in metrics


def test_a_client_that_leaves_a_stream_aborts_the_engine_request(fleet: InProcessFleet) -> None:
    port = fleet.config.model("slow").port
    with httpx.stream("POST", f"{fleet.url}/v1/responses", headers={"Authorization": "Bearer key-a"},
                      json={"model": "slow", "input": "x", "max_output_tokens": 50, "stream": True}, timeout=15) as r:
        for line in r.iter_lines():
            if "output_text.delta" in line:
                break
    from fleets import wait_until

    wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/fake/stats").json()["running"] == 0, "the engine request ended")
    assert httpx.get(f"http://127.0.0.1:{port}/fake/stats").json()["aborted"] >= 1


def test_the_store_keeps_at_most_max_stored(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    f = fake_fleet({"name": "m"}, responses={"store_path": str(tmp_path / "s.sqlite3"), "max_stored": 2})
    with client(f) as c:
        ids = [c.responses.create(model="m", input=f"n{k}", max_output_tokens=1).id for k in range(3)]
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(ids[0])
        assert [c.responses.retrieve(i).id for i in ids[1:]] == ids[1:]


def test_a_conversation_continues_after_the_gateway_restarts(cache_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_LOG_DIR", str(tmp_path / "logs"))
    store = {"store_path": str(tmp_path / "kept.sqlite3")}
    with fake_fleets() as start:
        before = start({"name": "m"}, responses=store)
        with client(before) as c:
            first = c.responses.create(model="m", input="one two three", max_output_tokens=2)
        before.stop()
        after = start({"name": "m"}, responses=store)
        with client(after) as c:
            assert c.responses.retrieve(first.id).output_text == first.output_text
            second = c.responses.create(model="m", input="four", previous_response_id=first.id, max_output_tokens=2)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_a_store_that_fails_keeps_no_answer_from_its_client_and_reads_are_503s(
        fake_fleet: FakeFleets, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A real failure of SQLite's: the database's files overwritten under the open store (a disk
    that corrupts them). The answers still come, whole and streamed; reading the store is a 503."""
    store = tmp_path / "s.sqlite3"
    f = fake_fleet({"name": "m"}, responses={"store_path": str(store)})
    with client(f) as c:
        kept = c.responses.create(model="m", input="one two", max_output_tokens=2)
        for part in tmp_path.glob("s.sqlite3*"):
            part.write_bytes(b"\xff" * part.stat().st_size)
        with caplog.at_level(logging.ERROR, logger="fleet.gateway"):
            whole = c.responses.create(model="m", input="one two", max_output_tokens=2)
            streamed = raw_events(f, model="m", input="one two", max_output_tokens=2)
        assert whole.output_text == kept.output_text == streamed[-1].response.output_text
        assert streamed[-1].type == "response.incomplete"
        [line] = [r.getMessage() for r in caplog.records if "could not keep" in r.getMessage()]  # one line a minute
        assert str(store) in line and whole.id in line and "previous_response_id will not find it" in line
        for call in (lambda: c.responses.retrieve(kept.id), lambda: c.responses.delete(kept.id),
                     lambda: c.responses.create(model="m", input="three", previous_response_id=kept.id)):
            with pytest.raises(openai.InternalServerError) as e:
                call()
            assert e.value.status_code == 503 and e.value.code == "store_unavailable"
            assert "the responses store cannot be" in e.value.message
