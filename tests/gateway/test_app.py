"""The gateway (fleet.gateway.app and the routes it serves) against fake engines on real ports,
through the real launcher and real clients. What needs the real engine's output (real text, seeds,
stop strings applied by vLLM) is tests/e2e/test_fleet.py's.

One fleet per module (fake engines start in about a second):
- ``alpha`` and ``beta``: well-behaved; beta's words are ``b0 b1 ...`` so routing shows in the text,
- ``slow``: 0.1 s between tokens (streaming and disconnects),
- ``broken``: sends an engine Error frame after 2 deltas,
- ``garbled``: sends a frame the gateway cannot decode after 2 deltas,
- ``loading``: never becomes ready (503 + Retry-After).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fake_engine import expected_text, token_logprob
from fleets import FakeFleets, InProcessFleet, wait_until

MODELS: dict[str, dict[str, Any]] = {
    "alpha": {},
    "beta": {"fake_word": "b"},
    "slow": {"fake_token_delay": 0.1},
    "broken": {"fake_error_mid_stream": 2},
    "garbled": {"fake_unreadable_mid_stream": 2},
    "loading": {"fake_hang_at_start": True},
}
SERVING = ("alpha", "beta", "slow", "broken", "garbled")


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets) -> InProcessFleet:
    return module_fake_fleet(*({"name": name, "engine_args": args} for name, args in MODELS.items()), ready=SERVING)


@pytest.fixture(scope="module")
def http(fleet: InProcessFleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=15) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(fleet: InProcessFleet) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=15)
    try:
        yield client
    finally:
        client.close()


def engine_stats(fleet: InProcessFleet, name: str) -> dict[str, Any]:
    """The fake engine's own counters (GET /fake/stats on its port)."""
    return httpx.get(f"http://127.0.0.1:{fleet.config.model(name).port}/fake/stats", timeout=5).json()


def sse_data(lines: Iterator[str]) -> list[str]:
    """The data fields of a raw SSE body, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def post(http: httpx.Client, **body: Any) -> httpx.Response:
    return http.post("/v1/completions", json=body)


def assert_openai_error(r: httpx.Response, status: int, *, param: str | None, code: str | None, type: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type, param, code)
    return error


# --- routing and models ------------------------------------------------------------------


def test_routes_each_request_to_the_engine_of_the_model_it_names(fleet: InProcessFleet, sdk: openai.OpenAI) -> None:
    before = {name: engine_stats(fleet, name)["requests"] for name in ("alpha", "beta")}
    a = sdk.completions.create(model="alpha", prompt="hi", max_tokens=3)
    b = sdk.completions.create(model="beta", prompt="hi", max_tokens=3)
    b2 = sdk.completions.create(model="beta", prompt="hi", max_tokens=2)
    assert (a.model, a.choices[0].text) == ("alpha", expected_text(3))
    assert (b.model, b.choices[0].text) == ("beta", expected_text(3, word="b"))
    assert b2.choices[0].text == expected_text(2, word="b")
    after = {name: engine_stats(fleet, name)["requests"] for name in ("alpha", "beta")}
    assert (after["alpha"] - before["alpha"], after["beta"] - before["beta"]) == (1, 2)


def test_engines_get_a_token_and_only_the_gateway_presents_it(fleet: InProcessFleet, sdk: openai.OpenAI) -> None:
    sdk.completions.create(model="alpha", prompt="hi", max_tokens=1)
    stats = engine_stats(fleet, "alpha")
    assert stats["token_required"] and stats["refused"] == 0
    port = fleet.config.model("alpha").port
    assert httpx.post(f"http://127.0.0.1:{port}/generate", content=b"", timeout=5).status_code == 401
    assert engine_stats(fleet, "alpha")["refused"] == 1


def test_models_lists_every_model_with_its_engine_state(http: httpx.Client, sdk: openai.OpenAI) -> None:
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    states = {card["id"]: card["state"] for card in body["data"]}
    assert states == {"alpha": "ready", "beta": "ready", "slow": "ready", "broken": "ready", "garbled": "ready",
              "loading": "starting"}
    assert all(card["object"] == "model" and card["owned_by"] == "fleet" for card in body["data"])
    assert sorted(m.id for m in sdk.models.list()) == sorted(MODELS)
    assert {m.id: m.model_extra["state"] for m in sdk.models.list().data} == states  # each state, through the SDK too


def test_a_model_is_retrieved_by_name_as_in_the_list(http: httpx.Client, sdk: openai.OpenAI) -> None:
    card = sdk.models.retrieve("loading")
    assert card.id == "loading" and card.owned_by == "fleet" and card.model_extra["state"] == "starting"
    assert http.get("/v1/models/alpha").json() == next(c for c in http.get("/v1/models").json()["data"] if c["id"] == "alpha")
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("org/gamma")  # a name may hold a slash: the whole rest of the path is the name
    assert missing.value.body["param"] == "model" and "'org/gamma'" in missing.value.body["message"]


def test_gateway_health_reports_each_engine_state(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    assert r.json()["models"]["loading"] == "starting"
    assert r.json()["models"]["alpha"] == "ready"


def test_unknown_model_is_404_model_not_found(http: httpx.Client, sdk: openai.OpenAI) -> None:
    error = assert_openai_error(
        post(http, model="gpt-17", prompt="hi"), 404, param="model", code="model_not_found", type="invalid_request_error"
    )
    assert "gpt-17" in error["message"] and "alpha" in error["message"]
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="gpt-17", prompt="hi")
    assert info.value.code == "model_not_found"
    assert info.value.body["code"] == "model_not_found"


def test_an_unknown_model_name_is_echoed_bounded(http: httpx.Client) -> None:
    error = assert_openai_error(post(http, model="m" * 10_000, prompt="hi"), 404, param="model",
                                code="model_not_found", type="invalid_request_error")
    assert "(10,000 characters)" in error["message"] and len(error["message"]) < 300


def test_n_beyond_the_models_cap_is_refused_by_the_documented_cap(http: httpx.Client) -> None:
    error = assert_openai_error(post(http, model="alpha", prompt="hi", n=10_000, temperature=1), 400, param="n",
                                code=None, type="invalid_request_error")
    assert error["message"] == "n is at most 16 for this model, got 10000"


def test_model_still_starting_is_503_with_retry_after(http: httpx.Client, sdk: openai.OpenAI) -> None:
    r = post(http, model="loading", prompt="hi")
    error = assert_openai_error(r, 503, param="model", code="model_not_ready", type="service_unavailable")
    assert "starting" in error["message"]
    assert int(r.headers["retry-after"]) > 0
    with pytest.raises(openai.InternalServerError) as info:
        sdk.completions.create(model="loading", prompt="hi")
    assert info.value.status_code == 503


# --- request validation ----------------------------------------------------------------------


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", content=b'{"model": "alpha", "prompt": ', headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, param=None, code=None, type="invalid_request_error")
    assert "JSON" in error["message"]


def test_wrong_type_is_400_naming_the_field(http: httpx.Client, sdk: openai.OpenAI) -> None:
    assert_openai_error(
        post(http, model="alpha", prompt="hi", max_tokens="a"), 400, param="max_tokens", code=None,
        type="invalid_request_error",
    )
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="alpha", prompt="hi", max_tokens="a")  # type: ignore[arg-type]
    assert info.value.param == "max_tokens"  # type: ignore[attr-defined]


def test_missing_prompt_is_400_naming_prompt(http: httpx.Client) -> None:
    error = assert_openai_error(post(http, model="alpha"), 400, param="prompt", code=None, type="invalid_request_error")
    assert "prompt" in error["message"]


def test_best_of_with_stream_is_400_naming_best_of(http: httpx.Client) -> None:
    assert_openai_error(
        post(http, model="alpha", prompt="hi", best_of=2, stream=True), 400, param="best_of", code=None,
        type="invalid_request_error",
    )


# --- completions -------------------------------------------------------------------------------


def test_string_prompt_gives_one_choice_and_usage(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt="the quick brown fox", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [(c.index, c.text, c.finish_reason, c.logprobs) for c in r.choices] == [(0, expected_text(5), "length", None)]
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)


def test_usage_is_always_present_for_non_streamed_responses(http: httpx.Client) -> None:
    body = post(http, model="alpha", prompt=["a b", "c"], n=2, max_tokens=2).json()
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # the fake caches nothing


def test_list_prompt_choices_are_ordered_prompt_index_times_n_plus_i(sdk: openai.OpenAI) -> None:
    prompts = ["one", "two three", "four five six"]
    r = sdk.completions.create(model="alpha", prompt=prompts, n=2, max_tokens=2, echo=True, seed=7)
    assert [c.index for c in r.choices] == list(range(6))
    for c in r.choices:
        p, i = divmod(c.index, 2)
        assert c.text == prompts[p] + expected_text(2, index=i, n=2)
    assert r.usage is not None and r.usage.prompt_tokens == 6
    # the last prompt's choices are those it gets asked alone (with the same seed, as a real engine samples them)
    single = sdk.completions.create(model="alpha", prompt=prompts[-1], n=2, max_tokens=2, echo=True, seed=7)
    assert [c.text for c in r.choices[4:]] == [c.text for c in single.choices]


def test_n_returns_n_distinct_choices(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt="hi", n=3, max_tokens=2)
    assert [c.text for c in r.choices] == [expected_text(2, index=i, n=3) for i in range(3)]
    assert [c.finish_reason for c in r.choices] == ["length"] * 3


def test_best_of_returns_the_n_highest_cumulative_logprob_candidates_reindexed(sdk: openai.OpenAI) -> None:
    best_of, n = 4, 2
    ranked = sorted(range(best_of), key=token_logprob, reverse=True)
    assert ranked[:n] != list(range(n))  # the fake's logprobs make "first n" the wrong answer
    r = sdk.completions.create(model="alpha", prompt="hi", n=n, best_of=best_of, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [expected_text(3, index=i, n=best_of) for i in ranked[:n]]
    assert all(c.logprobs is None for c in r.choices)  # the client did not ask for them


def test_best_of_with_one_choice_per_prompt_picks_the_best_candidate_of_each_prompt(sdk: openai.OpenAI) -> None:
    best = max(range(5), key=token_logprob)
    r = sdk.completions.create(model="alpha", prompt=["x", "y z"], best_of=5, max_tokens=2, echo=True)
    assert [(c.index, c.text) for c in r.choices] == [
        (0, "x" + expected_text(2, index=best, n=5)),
        (1, "y z" + expected_text(2, index=best, n=5)),
    ]


def test_logprobs_are_returned_per_token(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt="hi", max_tokens=3, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp is not None
    assert lp.tokens == [" w0", " w1", " w2"]
    assert lp.token_logprobs == [pytest.approx(token_logprob(0))] * 3
    assert lp.text_offset == [0, 3, 6]


def test_stop_string_ends_the_choice_before_it_with_finish_reason_stop(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt="hi", max_tokens=10, stop=[" w3"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected_text(3), "stop")


def test_echo_prepends_the_prompt(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt="say it", max_tokens=2, echo=True)
    assert r.choices[0].text == "say it" + expected_text(2)


def test_echo_of_a_token_id_prompt_prepends_the_engine_detokenized_text(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt=[5, 6], max_tokens=2, echo=True)
    assert r.choices[0].text == " t5 t6" + expected_text(2)


def test_unset_max_tokens_is_clamped_to_the_room_left_in_the_context(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="alpha", prompt=" ".join(["x"] * 60))  # context 64, default 16
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected_text(4), "length")


def test_engine_error_before_the_first_token_is_http_400_naming_the_field(http: httpx.Client, sdk: openai.OpenAI) -> None:
    error = assert_openai_error(
        post(http, model="alpha", prompt="hi", max_tokens=100), 400, param="max_tokens", code=None,
        type="invalid_request_error",
    )
    assert "64" in error["message"]
    assert_openai_error(
        post(http, model="alpha", prompt=" ".join(["x"] * 70)), 400, param="prompt", code=None,
        type="invalid_request_error",
    )
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="alpha", prompt="hi", max_tokens=100)


def test_engine_error_in_a_non_streamed_request_is_502_engine_error(http: httpx.Client) -> None:
    assert_openai_error(
        post(http, model="broken", prompt="hi", max_tokens=5), 502, param=None, code="engine_error", type="server_error"
    )


# --- streaming ---------------------------------------------------------------------------------


def test_stream_via_sdk_yields_one_delta_per_token_then_ends(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.completions.create(model="alpha", prompt="hi", max_tokens=4, stream=True))
    assert [c.choices[0].text for c in chunks] == [expected_text(k + 1)[len(expected_text(k)):] for k in range(4)]
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "length"]
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.model == "alpha" and c.usage is None for c in chunks)


def test_stream_raw_sse_is_event_stream_and_ends_with_done(http: httpx.Client) -> None:
    with http.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)  # every event a data field, nothing else
    data = sse_data(iter(events))
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert "".join(e["choices"][0]["text"] for e in events) == expected_text(3)
    assert all(e["object"] == "text_completion" for e in events)


def test_stream_with_n_and_list_prompt_indexes_choices_prompt_index_times_n_plus_i(http: httpx.Client) -> None:
    body = {"model": "alpha", "prompt": ["a", "b"], "n": 2, "max_tokens": 2, "stream": True, "echo": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        data = sse_data(r.iter_lines())
    assert data[-1] == "[DONE]"
    texts: dict[int, str] = {}
    for d in data[:-1]:
        for c in json.loads(d)["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {p * 2 + i: prompt + expected_text(2, index=i, n=2) for p, prompt in enumerate("ab") for i in range(2)}


def test_stream_options_include_usage_adds_a_final_usage_chunk_with_no_choices(sdk: openai.OpenAI) -> None:
    chunks = list(sdk.completions.create(
        model="alpha", prompt="one two", max_tokens=3, stream=True, stream_options={"include_usage": True}
    ))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (2, 3, 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == expected_text(3)


def stream_to_error_event(http: httpx.Client, model: str) -> dict:
    """A stream from an engine that fails after two tokens: it delivers them, then the error event
    (returned), then [DONE]."""
    body = {"model": model, "prompt": "hi", "max_tokens": 10, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = sse_data(r.iter_lines())
    assert data[-1] == "[DONE]"
    *chunks, error = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" w0", " w1"]
    return error


def test_engine_error_mid_stream_becomes_an_error_event_then_done(http: httpx.Client, sdk: openai.OpenAI) -> None:
    error = stream_to_error_event(http, "broken")
    assert error["error"]["code"] == "engine_error" and error["error"]["message"]
    received: list[str] = []
    with pytest.raises(openai.APIError, match="fake engine failure"):
        for chunk in sdk.completions.create(model="broken", prompt="hi", max_tokens=10, stream=True):
            received.append(chunk.choices[0].text)
    assert received == [" w0", " w1"]


def test_a_frame_the_gateway_cannot_read_fails_the_request_not_the_stream(http: httpx.Client) -> None:
    """An engine frame that does not decode (a finish reason the wire lacks, an engine of another
    version) is an engine error: an error event then [DONE] mid-stream, a 502 whole; never a
    stream cut short."""
    error = stream_to_error_event(http, "garbled")
    assert error["error"]["code"] == "engine_error" and "cannot read" in error["error"]["message"]
    error = assert_openai_error(post(http, model="garbled", prompt="hi", max_tokens=5), 502, param=None,
                                code="engine_error", type="server_error")
    assert "cannot read" in error["message"]


def test_engine_error_before_the_first_byte_is_http_400_even_when_streaming(http: httpx.Client, sdk: openai.OpenAI) -> None:
    r = post(http, model="alpha", prompt="hi", max_tokens=100, stream=True)
    assert_openai_error(r, 400, param="max_tokens", code=None, type="invalid_request_error")
    with pytest.raises(openai.BadRequestError):
        sdk.completions.create(model="alpha", prompt="hi", max_tokens=100, stream=True)


def test_client_disconnect_mid_stream_aborts_the_engine_request(fleet: InProcessFleet) -> None:
    before = engine_stats(fleet, "slow")
    assert before["running"] == 0
    body = {"model": "slow", "prompt": "hi", "max_tokens": 60, "stream": True}  # 6 s if left to finish
    with httpx.Client(base_url=fleet.url, timeout=15) as client, client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept referenced: a collected iterator would close the connection
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[len("data: "):])["choices"][0]["text"] == " w0"
        assert engine_stats(fleet, "slow")["running"] == 1
    # leaving the block drops the connection mid-stream
    wait_until(lambda: engine_stats(fleet, "slow")["running"] == 0, "the engine request stopped running", timeout=5)
    after = engine_stats(fleet, "slow")
    assert after["aborted"] == before["aborted"] + 1  # stopped by the disconnect, not finished
