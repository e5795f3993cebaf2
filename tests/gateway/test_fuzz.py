"""The gateway under hostile input: schemathesis against its own OpenAPI document, then by hand.

A fleet of fake engines (tests/fake_engine.py) runs in-process on free ports. Two parts:

1. **Schemathesis** loads the document the gateway serves (``/schema/openapi.json``, written by
   fleet/gateway/openapi.py from the msgspec Structs) and sends what it generates to /v1/completions,
   /v1/chat/completions, /v1/models, /v1/models/{model}, /v1/embeddings, /tokenize, /detokenize,
   /health and /metrics: schema-valid and schema-invalid
   bodies (positive and negative modes), boundary values (its coverage phase) and methods the
   document does not list. Every response must pass schemathesis' checks (no 5xx, a documented
   status, content type, headers and body) and two of ours: every error is OpenAI's envelope
   with a message, and every 200 stream is well-formed server-sent events ending in [DONE].
   The /fleet control routes are left out: /fleet/stop would stop the fleet under test.

   One check is off, ``positive_data_acceptance`` (schema-valid bodies must get a 2xx): the
   document cannot say the rules that relate fields (best_of >= n, beam search settings,
   stream_options only with stream...), nor a model's context length or limits, so schema-valid
   bodies get 400s by design. Every such 400 is still checked against the documented envelope.

2. **Hand-written cases**: malformed JSON, wrong types, huge numbers, unicode and empty strings in
   every string field, deep nesting, bodies over max_body_bytes. Each must be a 4xx with a clear
   message in OpenAI's envelope; never a 5xx, never a hang (every client call has a timeout).

Knobs: ``FLEET_FUZZ_EXAMPLES`` (Hypothesis examples per operation and mode, default 150) and
``FLEET_FUZZ_RANDOM=1`` (a fresh random seed instead of the fixed, CI-stable one).
"""

from __future__ import annotations

import collections
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import requests
import schemathesis
from fake_engine import fake_command
from fleets import InProcessFleet, free_port
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from fleet.api.chat.protocol import ChatCompletionChunk
from fleet.api.completions.protocol import CompletionChunk
from fleet.api.protocol import ErrorResponse
from fleet.api.responses.protocol import Event
from fleet.config.load import parse_config
from fleet.gateway.app import create_app
from fleet.gateway.openapi import document

EXAMPLES = int(os.environ.get("FLEET_FUZZ_EXAMPLES", "150"))
TIMEOUT = 10  # seconds any one request may take: far above what a fake engine needs
ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
          ("POST", "/v1/embeddings"), ("POST", "/tokenize"), ("POST", "/detokenize"), ("POST", "/v1/responses"),
          ("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/responses/{response_id}"),
          ("GET", "/v1/responses/{response_id}/input_items"),
          ("GET", "/health"), ("GET", "/metrics")}
MIN_REQUESTS = 1000

# Small per-request caps keep the work of any generated request bounded (fake context: 64 tokens).
LIMITS = {"max_tokens": 32, "n": 4, "best_of": 4, "prompts": 8, "prompt_chars": 20_000}
MODELS: dict[str, dict[str, Any]] = {"alpha": {}, "beta": {"fake_word": "b"}}  # fuzzed, with LIMITS
OPEN = "open"  # default limits (no max_tokens cap): the hand-written cases, as a fleet gets them by default
EMBED = "vec"  # an embedding model (the fake's vectors), fuzzed through /v1/embeddings
MAX_BODY = 8 << 20  # GatewayConfig's default max_body_bytes: what a fleet gets without saying


@pytest.fixture(scope="module")
def fleet(cache_dir: Path) -> Iterator[InProcessFleet]:
    config = parse_config({
        "gateway": {"host": "127.0.0.1", "port": free_port()},
        "models": [
            *({"name": name, "source": "fake", "port": free_port(), "engine_args": args, "limits": LIMITS}
              for name, args in MODELS.items()),
            {"name": OPEN, "source": "fake", "port": free_port()},
            {"name": EMBED, "source": "fake", "port": free_port(), "task": "embed", "limits": LIMITS},
        ],
    })
    running = InProcessFleet(config, fake_command)
    try:
        for name in [*MODELS, OPEN, EMBED]:
            assert running.wait_state(name, "ready", "failed", timeout=60) == "ready", running.fleet.owners[name].tail
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def http(fleet: InProcessFleet) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fleet.url, timeout=TIMEOUT) as client:
        yield client


# --- schemathesis -----------------------------------------------------------------------------


Traffic = collections.Counter[tuple[str, str, int, str]]


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    """Requests schemathesis sent, by (method, path template, status, content type); checked after the fuzz."""
    return collections.Counter()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def gateway_document() -> dict[str, Any]:
    """The OpenAPI document of the gateway, as /schema/openapi.json serves it.

    Built in-process at import time: schemathesis' pytest integration needs the schema when tests
    are collected, before any fleet runs (its fixture-based loader does not work with pytest 9).
    A test below checks that the served document is this one.
    """
    return document(create_app({}))


# Whole streams (schemathesis reads 20 events of a stream by default): the longest here is
# 8 prompts x 4 choices x 32 tokens.
CONFIG = schemathesis.Config.from_dict({"max-stream-events": 2000})
schema = schemathesis.openapi.from_dict(gateway_document(), config=CONFIG).exclude(path_regex="^/fleet/")


@schema.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    """Point four bodies in five that name a model at one of the fleet's.

    A random `model` is almost never a fleet model (a 404 before any real work); this way the
    rules, the engines and the response shaping get fuzzed too. A non-string `model` (negative
    mode) is left as generated.
    """
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return st.sampled_from([None, *MODELS, *MODELS, EMBED]).map(
            lambda name: body if name is None else {**body, "model": name}
        )
    return st.just(body)


# Fields whose rules (best_of >= n, beam search settings, context length, the model's caps...) a
# random schema-valid value breaks more often than not; and the last line's fields, whose lower
# bounds (`ge=0`, `gt=0`) the document lacked while Litestar wrote it, so that a "valid" value was
# often a 400 (msgspec's schemas have them; they stay here so that the fuzz draws as before).
RULE_BOUND = frozenset({
    "n", "best_of", "use_beam_search", "early_stopping", "length_penalty", "suffix", "logit_bias", "top_k",
    "min_tokens", "stop_token_ids", "max_tokens", "max_completion_tokens", "stream_options", "top_logprobs",
    "tools", "tool_choice", "response_format",
    "temperature", "top_p", "min_p", "repetition_penalty", "logprobs",
})


def tame(body: dict[str, Any]) -> dict[str, Any]:
    """The body without the rule-bound fields, and its messages without what fleet rightly refuses
    for these models: tool messages and calls (no tool calling here) and content parts other than
    text (no images or audio)."""
    out = {k: v for k, v in body.items() if k not in RULE_BOUND}
    if isinstance(out.get("messages"), list):
        out["messages"] = [tame_message(m) if isinstance(m, dict) else m for m in out["messages"]]
    return out


def tame_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    if out.get("role") == "tool":
        out["role"] = "user"
    if isinstance(out.get("content"), list):
        out["content"] = [p for p in out["content"] if isinstance(p, dict) and p.get("type") == "text"] or ""
    return out


@schema.hook
def flatmap_case(context: Any, case: schemathesis.Case) -> st.SearchStrategy[schemathesis.Case]:
    """Steer schema-valid bodies for a fleet model deeper: half go without the rule-bound fields,
    and half ask for a stream (an optional field is seldom drawn at all).

    With every field drawn at random almost every request breaks some rule (a 400, rightly), and
    answers and streams would seldom be fuzzed. Only positive cases: a negative one must stay
    invalid, and dropping fields could drop what makes it so.
    """
    body = case.body
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if not (positive and isinstance(body, dict) and body.get("model") in MODELS):
        return st.just(case)

    def steer(tamed: bool, stream: bool) -> schemathesis.Case:
        steered = tame(body) if tamed or stream else dict(body)  # a stream with random rule-bound fields: a 400
        if stream:
            steered["stream"] = True
        case.body = steered
        return case

    return st.tuples(st.booleans(), st.booleans()).map(lambda choice: steer(*choice))


def content_type(response: schemathesis.Response) -> str:
    return next((v[0] for k, v in response.headers.items() if k.lower() == "content-type" and v), "")


def openai_error_envelope(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """Every error, documented status or not (405, 404 on an unknown path), is OpenAI's envelope."""
    if response.status_code < 400:
        return
    assert content_type(response).startswith("application/json"), response.headers
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert isinstance(error["type"], str) and error["type"], error


CHUNKS = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


def event_stream(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """A 200 `text/event-stream` is `data: <chunk>` events, each a whole chunk object of the route
    (or an error envelope) as fleet's own msgspec types describe it, ending in `data: [DONE]`."""
    if response.status_code != 200 or not content_type(response).startswith("text/event-stream"):
        return
    text = response.content.decode()
    assert not response.stream_cut_short, "schemathesis stopped reading: raise max-stream-events"
    if case.path == "/v1/responses":  # typed events: `event: <type>` and its data, no [DONE]
        blocks = [block.split("\n") for block in text.split("\n\n") if block]
        assert blocks and all(len(b) == 2 and b[0].startswith("event: ") and b[1].startswith("data: ") for b in blocks)
        events = [msgspec.json.decode(b[1][len("data: "):], type=Event) for b in blocks]
        assert [type(e).__struct_config__.tag for e in events] == [b[0][len("event: "):] for b in blocks]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        return
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text[:500]
    assert len(events) >= 2, text  # at least one chunk before [DONE]
    for e in events[:-1]:
        chunk = json.loads(e[len("data: "):])
        msgspec.convert(chunk, ErrorResponse if "error" in chunk else CHUNKS[case.path])  # a missing field, a wrong type


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("FLEET_FUZZ_RANDOM"),
    suppress_health_check=list(HealthCheck),
)
def test_openapi_fuzz_no_5xx_and_every_response_as_documented(
    case: schemathesis.Case, fleet: InProcessFleet, session: requests.Session, traffic: Traffic,
) -> None:
    response = case.call(base_url=fleet.url, session=session, timeout=TIMEOUT)
    kind = content_type(response).split(";")[0]
    traffic[(case.method.upper(), case.path, response.status_code, kind)] += 1
    case.validate_response(
        response,
        excluded_checks=[positive_data_acceptance],  # see the module docstring
        additional_checks=[openai_error_envelope, event_stream],
    )


def test_openapi_fuzz_sent_at_least_1000_requests_over_every_route(traffic: Traffic) -> None:
    """The fuzz above (run first, same module) reached every route, in volume, and got past the
    checks into the engines: JSON answers and event streams from both generation routes."""
    print(f"schemathesis sent {sum(traffic.values())} requests:", dict(sorted(traffic.items())))
    routes = {(method, path) for method, path, _, _ in traffic}
    assert routes >= ROUTES, f"routes never fuzzed: {ROUTES - routes} (run the whole module)"
    assert sum(traffic.values()) >= MIN_REQUESTS, traffic
    # The examples are derandomized but not the same in every selection of tests: `pytest tests/`
    # and `pytest tests/gateway/test_fuzz.py` draw different ones (reproduce CI's with `pytest tests/ -k
    # openapi_fuzz`). Across them each route got 10-33 answers here; the floor below says that the
    # fuzz got through the rules into the engines, on both routes, in both answer forms.
    answered_total = 0
    for path in ("/v1/completions", "/v1/chat/completions"):
        answered = {kind: n for (_, p, status, kind), n in traffic.items() if p == path and status == 200}
        assert sum(answered.values()) >= 5 and set(answered) == {"application/json", "text/event-stream"}, (path, answered)
        answered_total += sum(answered.values())
    assert answered_total >= 20, traffic


def test_openapi_document_describes_what_the_gateway_sends(fleet: InProcessFleet) -> None:
    """The document the fuzz relies on: OpenAI's error envelope, Retry-After, streams, metrics."""
    doc = httpx.get(f"{fleet.url}/schema/openapi.json", timeout=TIMEOUT).json()
    assert doc == json.loads(json.dumps(gateway_document())), "the fuzz must run on the served document"
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "404", "413", "429", "503"} <= set(responses), (path, sorted(responses))
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in ("429", "503"):
            assert responses[status]["headers"]["Retry-After"]["required"] is True
        error = responses["400"]["content"]["application/json"]["schema"]
        error = doc["components"]["schemas"][error["$ref"].rsplit("/", 1)[-1]] if "$ref" in error else error
        assert error["required"] == ["error"], error
    assert "text/plain" in next(iter(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]))


# --- hand-written hostile input ------------------------------------------------------------------


def assert_4xx(r: httpx.Response, status: int = 400, *, param: str | None = None, mentions: str = "") -> dict:
    """A client error in OpenAI's envelope, with a message that says what is wrong."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) >= 10, error
    assert error["type"] == "invalid_request_error", error
    if param is not None:
        assert names(error, param), (param, error)
    assert mentions.lower() in error["message"].lower(), error
    return error


def names(error: dict[str, Any], field: str) -> bool:
    """`param` is the field, or a place inside it (`prompt[0]`, `stream_options.include_usage`)."""
    param = error["param"] or ""
    return param == field or param.startswith((f"{field}[", f"{field}."))


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": OPEN, "prompt": "hi", "max_tokens": 2, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": OPEN, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


@pytest.mark.parametrize(("template", "param"), [
    ('{"model": "alpha", "input": "hi", "tool_choice": "required", "tools": [{"type": "function", "name": "f", '
     '"parameters": %s}]}', "tools[0].parameters"),
    ('{"model": "alpha", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": %s}}}',
     "text.format.schema"),
])
def test_a_json_schema_naming_too_many_properties_is_a_400_naming_it(http: httpx.Client, template: str, param: str) -> None:
    wide = json.dumps({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(10_000)}})
    r = http.post("/v1/responses", content=template % wide, headers={"content-type": "application/json"})
    assert_4xx(r, mentions="more than 512 properties")
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("field", ["stop", "bad_words"])
def test_a_hundred_thousand_stop_sequences_or_bad_words_are_a_400_naming_the_field(
        http: httpx.Client, route: str, field: str) -> None:
    """Each costs the engine work at every token of every stream: a list under the body limit would
    slow the whole engine (7.9 ms a token for 100,000 stop sequences)."""
    body = {"model": OPEN, "max_tokens": 2, field: [f"w{i}" for i in range(100_000)],
            **({"prompt": "hi"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]})}
    assert_4xx(http.post(route, json=body), param=field, mentions="got 100000")


def deep_schema(objects: int) -> str:
    return '{"type": "object", "properties": {"a": ' * objects + '{"type": "string"}' + "}}" * objects


@pytest.mark.parametrize("objects", [32, 300])  # 300: jsonschema's check recursed past Python's limit (a 500)
@pytest.mark.parametrize(("route", "template", "param"), [
    ("/v1/chat/completions", '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", '
     '"tools": [{"type": "function", "function": {"name": "f", "parameters": %s}}]}', "tools[0].function.parameters"),
    ("/v1/chat/completions", '{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "response_format": '
     '{"type": "json_schema", "json_schema": {"name": "x", "schema": %s}}}', "response_format.json_schema.schema"),
    ("/v1/responses", '{"model": "alpha", "input": "hi", "tool_choice": "required", '
     '"tools": [{"type": "function", "name": "f", "parameters": %s}]}', "tools[0].parameters"),
    ("/v1/responses", '{"model": "alpha", "input": "hi", "text": {"format": {"type": "json_schema", "name": "x", '
     '"schema": %s}}}', "text.format.schema"),
    ("/v1/completions", '{"model": "alpha", "prompt": "hi", "structured_outputs": {"json": %s}}', "structured_outputs.json"),
])
def test_a_json_schema_nested_too_deep_is_a_400_naming_it_on_every_route_that_takes_one(
        http: httpx.Client, objects: int, route: str, template: str, param: str) -> None:
    """The engine compiles a schema into a grammar in a time that grows steeply with its depth."""
    r = http.post(route, content=template % deep_schema(objects), headers={"content-type": "application/json"})
    assert_4xx(r, mentions="deeper than 64 levels")
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"", "empty"),
        (b"   ", "JSON"),
        (b"{", "JSON"),
        (b'{"model": "alpha", "prompt": ', "JSON"),
        (b'{"model": "alpha",}', "JSON"),
        (b"{'model': 'alpha'}", "JSON"),
        (b'{"model": "alpha", "prompt": "hi"} trailing', "JSON"),
        (b"\xff\xfe\x00\x01", "JSON"),
        (b'{"model": "alpha", "prompt": "\xc3\x28"}', "JSON"),  # invalid UTF-8 inside a string
        (b"NaN", "JSON"),
        (b'{"model": "alpha", "prompt": "hi", "temperature": NaN}', "JSON"),
        (b'{"model": "alpha", "prompt": "hi", "temperature": Infinity}', "JSON"),
        (b'{"model": "alpha", "prompt": "hi", "max_tokens": 1e999}', "JSON"),
        (b"null", "object"),
        (b"[]", "object"),
        (b"42", "object"),
        (b'"a string"', "object"),
    ],
)
def test_malformed_json_is_a_400_saying_what_is_wrong(http: httpx.Client, route: str, body: bytes, mentions: str) -> None:
    assert_4xx(http.post(route, content=body, headers={"content-type": "application/json"}), mentions=mentions)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", 5), ("model", None), ("model", ["alpha"]), ("prompt", 5.5), ("prompt", {"text": "hi"}),
        ("prompt", [["a"]]), ("prompt", [True]), ("prompt", [1, [2]]), ("max_tokens", "two"), ("max_tokens", 2.5),
        ("max_tokens", True), ("temperature", "hot"), ("temperature", [1]), ("top_p", {}), ("n", "one"),
        ("n", 1.5), ("best_of", "two"), ("logprobs", "yes"), ("echo", "maybe"), ("stop", 5), ("stop", [1, 2]),
        ("stream", "sometimes"), ("stream_options", "include"), ("stream_options", {"include_usage": "perhaps"}),
        ("seed", "x"), ("logit_bias", [1, 2]), ("logit_bias", {"5": "high"}), ("user", 5), ("suffix", 5),
        ("stop_token_ids", ["a"]), ("early_stopping", "sometimes"), ("use_beam_search", "nope"),
    ],
)
def test_wrong_type_in_completions_is_a_400_naming_the_field(http: httpx.Client, field: str, value: Any) -> None:
    """Strings that read as the right type ("2", "true") are accepted, as by vLLM's (pydantic) server."""
    assert_4xx(http.post("/v1/completions", json={**completion(), field: value}), param=field)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("messages", "hi", "messages"), ("messages", [], "messages"), ("messages", [{"content": "hi"}], "messages"),
        ("messages", [{"role": "wizard", "content": "hi"}], "messages"), ("messages", [{"role": "user", "content": 5}], "messages"),
        ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages"),
        ("logprobs", 3, "logprobs"), ("top_logprobs", "three", "top_logprobs"),
        ("response_format", {"type": "xml"}, "response_format"), ("response_format", "json", "response_format"),
        ("tools", {"name": "f"}, "tools"), ("max_completion_tokens", "five", "max_completion_tokens"),
    ],
)
def test_wrong_type_in_chat_is_a_400_naming_the_field(http: httpx.Client, field: str, value: Any, param: str) -> None:
    assert_4xx(http.post("/v1/chat/completions", json={**chat(), field: value}), param=param)


HUGE = [
    ("max_tokens", 10**30), ("max_tokens", 2**64), ("max_tokens", 2**63), ("max_tokens", 10**9), ("max_tokens", -(10**30)),
    ("n", 10**9), ("n", 10**30), ("best_of", 10**9), ("logprobs", 10**9), ("seed", 10**30), ("seed", -(10**30)),
    ("top_k", 10**30), ("top_k", -(10**30)), ("min_tokens", 10**30), ("min_tokens", 10**6),
    ("temperature", 1e308), ("temperature", -1e308), ("top_p", 1e308), ("min_p", 1e308),
    ("presence_penalty", 1e308), ("frequency_penalty", -1e308), ("repetition_penalty", 1e308),
    ("length_penalty", 1e308), ("prompt", [10**30]), ("prompt", [[2**64]]), ("prompt", [-(10**30)]),
    ("stop_token_ids", [10**30]), ("logit_bias", {str(10**30): 1}), ("logit_bias", {"-1": 1}),
    ("logit_bias", {"5": 1e308}), ("logit_bias", {"9" * 5000: 1}),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("field", "value"), HUGE)
def test_huge_numbers_in_completions_are_a_400_naming_the_field(
    http: httpx.Client, field: str, value: Any, stream: bool
) -> None:
    assert_4xx(http.post("/v1/completions", json=completion(**{field: value, "stream": stream})), param=field)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", 10**30), ("max_completion_tokens", 10**30), ("top_logprobs", 10**9), ("n", 10**9),
     ("temperature", 1e308), ("min_tokens", 10**30), ("seed", 10**30), ("top_k", 10**30)],
)
def test_huge_numbers_in_chat_are_a_400_naming_the_field(http: httpx.Client, field: str, value: Any) -> None:
    assert_4xx(http.post("/v1/chat/completions", json=chat(**{field: value})), param=field)


STRINGS = ["", " ", "\x00", "é😀", "\u202e\u200b\ufeff", "a\nb\r\n", "\ud7ff\ue000\U0010ffff", "日本語" * 100, '"}{\\']


@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_unicode_and_empty_strings_in_every_completions_string_field_are_never_a_5xx(
    http: httpx.Client, text: str
) -> None:
    """Each string field in turn: a normal answer or a clear 400/404, in both the JSON and the stream."""
    cases: list[tuple[str, dict[str, Any]]] = [
        ("model", {"model": text}), ("prompt", {"prompt": text}), ("prompt", {"prompt": [text, text]}),
        ("stop", {"stop": text}), ("stop", {"stop": [text]}), ("user", {"user": text}),
        ("suffix", {"suffix": text}), ("logit_bias", {"logit_bias": {text: 1}}),
        ("early_stopping", {"early_stopping": text}),
    ]
    for param, fields in cases:
        for stream in (False, True):
            r = http.post("/v1/completions", json=completion(**fields, stream=stream))
            assert r.status_code in (200, 400, 404), (param, r.status_code, r.text[:300])
            if r.status_code == 200:
                check_success(r, stream)
            else:
                assert_4xx(r, r.status_code, param=param)


@pytest.mark.parametrize("text", STRINGS, ids=range(len(STRINGS)))
def test_unicode_and_empty_strings_in_every_chat_string_field_are_never_a_5xx(http: httpx.Client, text: str) -> None:
    user = {"role": "user", "content": "hi"}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("model", {"model": text}), ("messages", {"messages": [{"role": "user", "content": text}]}),
        ("messages", {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}),
        ("messages", {"messages": [{"role": "user", "content": [{"type": text, "text": "hi"}]}]}),
        ("messages", {"messages": [{"role": "system", "content": text}, user]}),
        ("messages", {"messages": [{**user, "name": text}]}), ("stop", {"stop": [text]}), ("user", {"user": text}),
        ("tool_choice", {"tool_choice": text}),
        ("response_format", {"response_format": {"type": "json_schema", "json_schema": {"name": text, "schema": {}}}}),
    ]
    for param, fields in cases:
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json=chat(**fields, stream=stream))
            assert r.status_code in (200, 400, 404), (param, r.status_code, r.text[:300])
            if r.status_code == 200:
                check_success(r, stream)
            else:
                assert_4xx(r, r.status_code, param=param)


def check_success(r: httpx.Response, stream: bool) -> None:
    if stream:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.text.endswith("data: [DONE]\n\n"), r.text[-200:]
        for block in r.text.split("\n\n")[:-2]:
            assert "error" not in json.loads(block[len("data: "):]), block
    else:
        assert r.json()["choices"], r.text


def nested(depth: int) -> bytes:
    return b'{"model": "alpha", "prompt": "hi", "extra": ' + b"[" * depth + b"]" * depth + b"}"


@pytest.mark.parametrize("depth", [100, 10_000, 1_000_000])
def test_deeply_nested_json_is_answered_quickly_never_a_5xx(http: httpx.Client, depth: int) -> None:
    """Deep nesting in an ignored field: msgspec either skips it (200) or refuses it (400), fast."""
    started = time.monotonic()
    r = http.post("/v1/completions", content=nested(depth), headers={"content-type": "application/json"})
    assert time.monotonic() - started < 5
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    if r.status_code == 400:
        assert_4xx(r, mentions="JSON")


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_json_in_a_typed_field_is_a_400(http: httpx.Client, depth: int) -> None:
    body = b'{"model": "alpha", "prompt": ' + b"[" * depth + b"]" * depth + b"}"
    assert_4xx(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_body_over_max_body_bytes_is_a_413_in_the_envelope(http: httpx.Client, route: str) -> None:
    prompt = "x" * MAX_BODY
    body = {"model": "alpha", "prompt": prompt} if route == "/v1/completions" else {
        "model": "alpha", "messages": [{"role": "user", "content": prompt}]}
    assert_4xx(http.post(route, json=body), 413, mentions="max_body_bytes")


def test_chunked_body_over_max_body_bytes_is_a_413(http: httpx.Client) -> None:
    """No Content-Length to check up front: the gateway stops reading at the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "alpha", "prompt": "'
        for _ in range(MAX_BODY // (1 << 16) + 1):
            yield b"x" * (1 << 16)
        yield b'"}'

    assert_4xx(http.post("/v1/completions", content=chunks()), 413)


def test_a_chunked_body_in_many_pieces_is_read_whole(http: httpx.Client) -> None:
    body = json.dumps(completion(prompt="hello there", max_tokens=2)).encode()
    r = http.post("/v1/completions", content=(body[i:i + 3] for i in range(0, len(body), 3)))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_a_content_length_beyond_the_limit_is_a_413_before_the_body_is_sent(fleet: InProcessFleet) -> None:
    """A client announcing 1 TB gets its 413 at once: the gateway does not wait for the bytes."""
    host, port = fleet.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000000\r\n\r\n{")
        head = s.recv(65536).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head[:300]


def test_a_body_just_under_the_limit_is_read(http: httpx.Client) -> None:
    """Under the limit the body is parsed; the model's prompt_chars cap then answers, with a 400."""
    prompt = "x " * ((MAX_BODY - 1024) // 2)
    assert_4xx(http.post("/v1/completions", json=completion(prompt=prompt)), param="prompt", mentions="characters")


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/v1/nothing", 404), ("POST", "/v2/completions", 404), ("POST", "/v1/models", 405),
    ("DELETE", "/v1/completions", 405), ("GET", "/v1/chat/completions", 405), ("PUT", "/health", 405),
])
def test_unknown_route_or_method_is_a_4xx_in_the_envelope(http: httpx.Client, method: str, path: str, status: int) -> None:
    r = http.request(method, path)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if status == 405:
        assert r.headers["allow"], r.headers  # RFC 9110: a 405 says which methods the route has


def test_a_non_json_content_type_is_still_read_as_json(http: httpx.Client) -> None:
    """Clients that forget the header (curl -d) are served, as by OpenAI's and vLLM's servers."""
    r = http.post("/v1/completions", content=json.dumps(completion()).encode(), headers={"content-type": "text/plain"})
    assert r.status_code == 200, r.text


def test_the_gateway_still_serves_after_all_of_this(http: httpx.Client, fleet: InProcessFleet) -> None:
    assert http.post("/v1/completions", json=completion(max_tokens=3)).json()["choices"][0]["text"] == " w0 w1 w2"
    assert http.get("/health").json()["models"] == {name: "ready" for name in [*MODELS, OPEN, EMBED]}
    rows = http.get("/fleet/status").json()["models"]
    assert all(row["inflight"] == 0 for row in rows), rows
