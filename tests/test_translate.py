"""The sampling rules (vLLM 0.2.7's, the seed's), the precedence of defaults, best_of and logprobs.

Requests are built the way the gateway builds them: JSON bytes decoded into CompletionRequest.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from fleet.wire import protocol
from litestar.testing import TestClient

from fleet.gateway.app import create_app
from fleet.gateway.bodies import read_body
from fleet.config.schema import SamplingDefaults
from fleet.errors import BodyTooLarge, InvalidRequest
from fleet.api.completions.protocol import CompletionRequest
from fleet.api.rules import SamplingType, sampling_type
from fleet.api.answers import Candidate, best
from fleet.api.planning import Plan
from fleet.api.completions.serving import completion_logprobs, plan_completion


def request(**fields: Any) -> CompletionRequest:
    """A /v1/completions request as the gateway decodes it (JSON bytes -> CompletionRequest)."""
    body = {"model": "m", "prompt": "Hello", **fields}
    return msgspec.json.decode(json.dumps(body).encode(), type=CompletionRequest)


def plan(defaults: SamplingDefaults | None = None, **fields: Any) -> Plan:
    return plan_completion(request(**fields), defaults or SamplingDefaults())


def rejected(param: str, *words: str, defaults: SamplingDefaults | None = None, **fields: Any) -> InvalidRequest:
    """plan_completion must refuse the request, naming `param` and saying `words`."""
    with pytest.raises(InvalidRequest) as e:
        plan(defaults, **fields)
    err = e.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.param == param, (err.param, err.message)
    for w in words:
        assert w in err.message, f"{w!r} not in {err.message!r}"
    return err


# --- rules that always apply ----------------------------------------------------------------


def test_best_of_must_be_at_least_n() -> None:
    rejected("best_of", "best_of must be >= n", "best_of=2", "n=3", n=3, best_of=2)


def test_best_of_cannot_be_streamed() -> None:
    rejected("best_of", "stream", n=1, best_of=3, stream=True)


def test_stream_with_n_greater_than_one_is_accepted() -> None:
    """n > 1 with best_of unset (so best_of == n) streams in OpenAI and vLLM: nothing to choose."""
    p = plan(n=3, stream=True, temperature=0.8)
    assert (p.n, p.sampling.n, p.stream) == (3, 3, True)


def test_beam_search_cannot_be_streamed() -> None:
    with pytest.raises(InvalidRequest, match="stream"):
        plan(use_beam_search=True, n=2, best_of=2, stream=True)


def test_top_k_zero_is_invalid() -> None:
    rejected("top_k", "-1", "at least 1", "got 0", top_k=0)


def test_top_k_negative_is_invalid() -> None:
    rejected("top_k", "got -5", top_k=-5)


def test_top_k_minus_one_and_positive_are_valid() -> None:
    assert plan(top_k=-1).sampling.top_k == -1
    assert plan(top_k=40).sampling.top_k == 40


def test_stream_options_require_stream() -> None:
    rejected("stream_options", "only allowed when stream is true", stream_options={"include_usage": True})
    rejected("stream_options", stream=False, stream_options={"include_usage": True})


def test_stream_options_null_without_stream_is_fine() -> None:
    assert plan(stream_options=None).include_usage is False


def test_include_usage_with_stream() -> None:
    p = plan(stream=True, stream_options={"include_usage": True})
    assert (p.stream, p.include_usage) == (True, True)


def test_empty_stop_string_is_invalid() -> None:
    rejected("stop", "empty", stop="")
    rejected("stop", "empty", stop=["\n", ""])


def test_stop_string_or_list() -> None:
    assert plan(stop="\n").sampling.stop == ["\n"]
    assert plan(stop=["a", "b"]).sampling.stop == ["a", "b"]
    assert plan(stop=None).sampling.stop == []


def test_logit_bias_key_must_be_a_token_id() -> None:
    rejected("logit_bias", "token ids", logit_bias={"hello": 5})


def test_logit_bias_key_must_not_be_negative() -> None:
    """Prompt token ids must be >= 0 (check_prompt); logit_bias keys are token ids too."""
    rejected("logit_bias", logit_bias={"-1": 5})


def test_logit_bias_keys_become_ints() -> None:
    assert plan(logit_bias={"50256": -100, "7": 2.5}).sampling.logit_bias == {50256: -100.0, 7: 2.5}
    assert plan(logit_bias=None).sampling.logit_bias is None


def test_suffix_is_a_400() -> None:
    rejected("suffix", "suffix is not supported", suffix="def f():")


def test_empty_prompt_list_is_invalid() -> None:
    rejected("prompt", "empty", prompt=[])


def test_empty_token_id_prompt_is_invalid() -> None:
    rejected("prompt", "empty", prompt=[[1, 2], []])


def test_mixed_prompt_list_is_invalid() -> None:
    rejected("prompt", "not a mix", prompt=["text", 1])
    rejected("prompt", "not a mix", prompt=[[1, 2], 3])


def test_negative_token_id_is_invalid() -> None:
    rejected("prompt", ">= 0", prompt=[1, -2, 3])
    rejected("prompt", ">= 0", prompt=[[1], [-1]])


# --- beam search ----------------------------------------------------------------------------


def test_beam_search_requires_best_of_greater_than_one() -> None:
    rejected("best_of", "beam width", "greater than 1", use_beam_search=True)
    rejected("best_of", "got 1", use_beam_search=True, best_of=1)


def test_beam_search_requires_temperature_zero() -> None:
    rejected("temperature", "temperature must be 0 when using beam search",
             use_beam_search=True, best_of=4, temperature=0.5)


def test_beam_search_requires_top_p_one() -> None:
    rejected("top_p", "top_p must be 1 when using beam search", use_beam_search=True, best_of=4, top_p=0.9)


def test_beam_search_requires_top_k_minus_one() -> None:
    rejected("top_k", "top_k must be -1 when using beam search", use_beam_search=True, best_of=4, top_k=40)


def test_beam_search_with_unset_temperature_is_accepted() -> None:
    p = plan(use_beam_search=True, best_of=4, n=2)
    assert p.sampling.temperature == 0.0
    assert (p.sampling.top_p, p.sampling.top_k) == (1.0, -1)
    assert p.beam == protocol.BeamSearch(width=4, length_penalty=1.0, early_stopping=False)
    assert p.sampling.n == 1  # the engine runs the beams itself
    assert (p.n, p.sampling.n if p.beam is None else p.beam.width) == (2, 4)


def test_beam_search_ignores_model_sampling_defaults() -> None:
    """An unset field never breaks a rule: a model default temperature/top_p/top_k is for sampling."""
    defaults = SamplingDefaults(temperature=0.7, top_p=0.9, top_k=40)
    p = plan(defaults, use_beam_search=True, best_of=3)
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k) == (0.0, 1.0, -1)


def test_beam_search_explicit_zero_temperature_is_accepted() -> None:
    assert plan(use_beam_search=True, best_of=2, temperature=0, top_p=1, top_k=-1).beam is not None


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_beam_search_early_stopping_values(early_stopping: bool | str) -> None:
    p = plan(use_beam_search=True, best_of=3, early_stopping=early_stopping, length_penalty=0.5)
    assert p.beam == protocol.BeamSearch(width=3, length_penalty=0.5, early_stopping=early_stopping)


def test_early_stopping_other_string_is_refused_when_decoding() -> None:
    assert decode_error(b'{"model": "m", "prompt": "x", "early_stopping": "sometimes"}').param == "early_stopping"


def test_early_stopping_requires_beam_search() -> None:
    rejected("early_stopping", "must be false when not using beam search", early_stopping=True)
    rejected("early_stopping", early_stopping="never")


def test_early_stopping_false_without_beam_search_is_fine() -> None:
    assert plan(early_stopping=False).beam is None


def test_length_penalty_requires_beam_search() -> None:
    rejected("length_penalty", "default value of 1 when not using beam search", length_penalty=2.0)


def test_length_penalty_one_without_beam_search_is_fine() -> None:
    assert plan(length_penalty=1.0).beam is None


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_requires_best_of_one() -> None:
    err = rejected("best_of", "greedy", "best_of=3", "raise the temperature", temperature=0, best_of=3)
    assert "temperature 0" in err.message


def test_greedy_requires_n_one() -> None:
    rejected("n", "greedy", "n=2", temperature=0, n=2)


def test_greedy_from_model_default_temperature_also_requires_best_of_one() -> None:
    rejected("best_of", "greedy", defaults=SamplingDefaults(temperature=0.0), best_of=2)


def test_greedy_resets_top_p_and_top_k() -> None:
    p = plan(temperature=0, top_p=0.5, top_k=10)
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k) == (0.0, 1.0, -1)
    assert p.beam is None


def test_sampling_type_is_decided_beam_then_greedy_then_random() -> None:
    assert sampling_type(True, 1.0) is SamplingType.BEAM
    assert sampling_type(True, 0.0) is SamplingType.BEAM
    assert sampling_type(False, 0.0) is SamplingType.GREEDY
    assert sampling_type(False, 5e-6) is SamplingType.GREEDY
    assert sampling_type(False, 1e-5) is SamplingType.RANDOM
    assert sampling_type(False, 0.7) is SamplingType.RANDOM


def test_random_sampling_keeps_top_p_and_top_k() -> None:
    p = plan(temperature=0.8, top_p=0.5, top_k=10)
    assert (p.sampling.temperature, p.sampling.top_p, p.sampling.top_k) == (0.8, 0.5, 10)
    assert p.beam is None


# --- precedence: user value -> model default -> OpenAI default -------------------------------

MODEL_DEFAULTS = SamplingDefaults(
    temperature=0.6, top_p=0.8, top_k=20, min_p=0.05, max_tokens=128,
    presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.1,
)
SAMPLED = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")


def sampled(p: Plan) -> dict[str, Any]:
    return {k: getattr(p.sampling, k) for k in (*SAMPLED, "max_tokens")}


def test_openai_defaults_when_nothing_is_set() -> None:
    p = plan()
    assert sampled(p) == {
        "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "repetition_penalty": 1.0, "max_tokens": 16,
    }
    assert (p.n, p.sampling.n, p.logprobs, p.sampling.logprobs, p.echo, p.stream) == (1, 1, None, None, False, False)


def test_model_defaults_fill_unset_fields() -> None:
    assert sampled(plan(MODEL_DEFAULTS)) == {k: getattr(MODEL_DEFAULTS, k) for k in (*SAMPLED, "max_tokens")}


def test_user_values_beat_model_defaults() -> None:
    user = {"temperature": 1.2, "top_p": 0.3, "top_k": 5, "min_p": 0.1, "max_tokens": 7,
            "presence_penalty": -1.0, "frequency_penalty": 1.5, "repetition_penalty": 1.3}
    assert sampled(plan(MODEL_DEFAULTS, **user)) == user


def test_explicit_null_means_unset() -> None:
    nulls = dict.fromkeys((*SAMPLED, "max_tokens", "n", "best_of", "logprobs", "seed", "stop", "logit_bias",
                           "echo", "stream", "suffix", "use_beam_search", "early_stopping", "length_penalty"))
    assert sampled(plan(MODEL_DEFAULTS, **nulls)) == sampled(plan(MODEL_DEFAULTS))
    assert sampled(plan(None, **nulls)) == sampled(plan())


def test_user_zero_is_a_value_not_unset() -> None:
    p = plan(MODEL_DEFAULTS, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, temperature=0.0)
    assert (p.sampling.presence_penalty, p.sampling.frequency_penalty, p.sampling.min_p) == (0.0, 0.0, 0.0)
    assert p.sampling.temperature == 0.0


def test_max_tokens_unset_may_be_clamped() -> None:
    assert plan().sampling.clamp_max_tokens is True
    assert plan(MODEL_DEFAULTS).sampling.clamp_max_tokens is True  # a default, not the client's
    p = plan(max_tokens=50)
    assert (p.sampling.max_tokens, p.sampling.clamp_max_tokens) == (50, False)


def test_other_fields_pass_through() -> None:
    p = plan(seed=42, min_tokens=3, ignore_eos=True, stop_token_ids=[2, 3])
    assert (p.sampling.seed, p.sampling.min_tokens, p.sampling.ignore_eos, p.sampling.stop_token_ids) == (
        42, 3, True, [2, 3])


# --- best_of and logprobs -------------------------------------------------------------------


def test_best_of_asks_the_engine_for_cumulative_logprobs_without_per_token_logprobs() -> None:
    p = plan(n=2, best_of=5, temperature=0.8)
    assert (p.n, p.sampling.n, p.sampling.n if p.beam is None else p.beam.width) == (2, 5, 5)
    assert p.sampling.cumulative_logprob  # needed to rank the candidates
    assert p.sampling.logprobs is None  # nothing per token: the client did not ask for logprobs
    assert p.logprobs is None  # ... but the client did not ask for logprobs


def test_best_of_keeps_the_clients_logprobs() -> None:
    p = plan(best_of=3, logprobs=2)
    assert (p.sampling.logprobs, p.logprobs) == (2, 2)


def test_best_of_equal_to_n_needs_no_logprobs() -> None:
    p = plan(n=2, best_of=2)
    assert (p.sampling.n, p.sampling.logprobs) == (2, None)


def test_echo_with_logprobs_asks_prompt_logprobs() -> None:
    p = plan(echo=True, logprobs=3)
    assert (p.echo, p.sampling.logprobs, p.sampling.prompt_logprobs) == (True, 3, 3)


def test_echo_without_logprobs_or_logprobs_without_echo_asks_no_prompt_logprobs() -> None:
    assert plan(echo=True).sampling.prompt_logprobs is None
    assert plan(logprobs=1).sampling.prompt_logprobs is None


# --- prompt forms ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("Hello", ["Hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
    ids=["string", "strings", "token-ids", "token-id-lists"],
)
def test_prompt_forms(prompt: Any, prompts: list[Any]) -> None:
    assert plan(prompt=prompt).prompts == prompts


# --- engine output -> OpenAI ----------------------------------------------------------------


def candidate(text: str, cumulative: float) -> Candidate:
    return Candidate(text=text, cumulative_logprob=cumulative)


def test_best_picks_the_n_highest_cumulative_logprobs() -> None:
    cands = [candidate("a", -3.0), candidate("b", -0.5), candidate("c", -7.0), candidate("d", -1.0)]
    assert [c.text for c in best(cands, 2)] == ["b", "d"]
    assert [c.text for c in best(cands, 1)] == ["b"]


def test_best_with_no_more_candidates_than_n_keeps_them_all() -> None:
    cands = [candidate("a", -3.0), candidate("b", -0.5)]
    assert [c.text for c in best(cands, 2)] == ["a", "b"]


def test_candidate_accumulates_deltas() -> None:
    c = Candidate()
    c.add(protocol.Delta(index=0, text="Hel", token_ids=[1, 2], logprobs=[protocol.TokenLogprob("Hel", -0.1)],
                         cumulative_logprob=-0.1))
    c.add(protocol.Delta(index=0, text="lo", token_ids=[3], logprobs=[protocol.TokenLogprob("lo", -0.2)],
                         finish_reason="length", cumulative_logprob=-0.3))
    assert (c.text, c.tokens, c.finish_reason, c.cumulative_logprob) == ("Hello", 3, "length", -0.3)
    assert [e.token for e in c.logprobs or []] == ["Hel", "lo"]


def test_completion_logprobs_text_offsets() -> None:
    entries = [
        protocol.TokenLogprob("The", None, None),
        protocol.TokenLogprob(" cat", -1.5, [(" cat", -1.5), (" dog", -2.0), (" cow", -3.0)]),
        protocol.TokenLogprob(" sat", -0.5, [(" sat", -0.5), (" ran", -1.0), (" is", -4.0)]),
    ]
    lp = completion_logprobs(entries, top=1)
    assert lp.tokens == ["The", " cat", " sat"]
    assert lp.token_logprobs == [None, -1.5, -0.5]
    assert lp.text_offset == [0, 3, 7]
    assert lp.top_logprobs == [None, {" cat": -1.5, " dog": -2.0}, {" sat": -0.5, " ran": -1.0}]


def test_completion_logprobs_offsets_start_where_asked() -> None:
    lp = completion_logprobs([protocol.TokenLogprob("ab", -1.0), protocol.TokenLogprob("c", -2.0)], None, 10)
    assert lp.text_offset == [10, 12]
    assert lp.top_logprobs == [None, None]


# --- decoding the request body --------------------------------------------------------------


class DecodeError:
    """The OpenAI error a body got from the gateway (decoded by Litestar + msgspec, before routing)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.param = body["error"]["param"]
        self.message = body["error"]["message"]


def post_body(body: bytes, path: str = "/v1/completions") -> tuple[int, dict[str, Any]]:
    with TestClient(create_app({})) as client:  # no models: a body that decodes is a 404
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


def test_decode_malformed_json() -> None:
    err = decode_error(b'{"model": "m", "prompt": ')
    assert err.param is None
    assert "not valid JSON" in err.message


def test_decode_missing_model_names_model() -> None:
    err = decode_error(b'{"prompt": "x"}')
    assert err.param == "model"
    assert "missing required field `model`" in err.message


def test_decode_missing_prompt_names_prompt() -> None:
    assert decode_error(b'{"model": "m"}').param == "prompt"


def test_decode_body_not_an_object() -> None:
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


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_generation_routes_answer_options_and_refuse_other_methods(path: str) -> None:
    with TestClient(create_app({})) as client:
        options = client.options(path)
        assert options.status_code == 204 and set(options.headers["allow"].split(", ")) == {"OPTIONS", "POST"}
        for method in ("GET", "PUT", "DELETE", "PATCH"):
            r = client.request(method, path)
            assert r.status_code == 405 and r.headers["allow"] == "POST, OPTIONS", (method, r.text)
            assert r.json()["error"]["message"] == "Method Not Allowed"


def read(messages: list[dict[str, Any]], limit: int, headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """`read_body` over ASGI messages handed out one by one, as a server delivers a chunked body."""
    pending = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(pending)

    return asyncio.run(read_body({"headers": headers or []}, receive, limit))  # type: ignore[arg-type]


def test_read_body_joins_the_pieces_of_a_chunked_body() -> None:
    pieces = [{"type": "http.request", "body": part, "more_body": True} for part in (b'{"a"', b": ", b"1")]
    assert read(pieces + [{"type": "http.request", "body": b"}", "more_body": False}], 100) == b'{"a": 1}'


def test_read_body_stops_at_the_limit_declared_or_sent() -> None:
    with pytest.raises(BodyTooLarge):
        read([{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 2, 100)
    with pytest.raises(BodyTooLarge):
        read([{"type": "http.request", "body": b"x" * 101}], 100)
    with pytest.raises(BodyTooLarge):  # refused before any byte is read
        read([], 100, [(b"content-length", b"101")])
    assert read([{"type": "http.request", "body": b"x" * 100}], 100) == b"x" * 100


def test_decode_ignores_unknown_fields() -> None:
    status, payload = post_body(b'{"model": "m", "prompt": "x", "store": true, "parallel_tool_calls": false}')
    assert status == 404 and payload["error"]["code"] == "model_not_found"  # decoded, then routed


# --- framing of /generate responses ---------------------------------------------------------------


FRAMES: list[protocol.Frame] = [
    protocol.Prompt(token_ids=[1, 2, 3]),
    *(protocol.Delta(index=0, text=f" t{k}", token_ids=[100 + k]) for k in range(5)),
    protocol.Delta(index=0, text="é" * 300, token_ids=[7], finish_reason="length"),
    protocol.Done(prompt_tokens=3, completion_tokens=6),
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64, 1 << 20])
def test_frame_splitter_yields_every_frame_in_order_however_the_bytes_are_chunked(chunk: int) -> None:
    wire = b"".join(protocol.encode_frame(f) for f in FRAMES)
    splitter = protocol.FrameSplitter()
    got: list[protocol.Frame] = []
    for start in range(0, len(wire), chunk):
        got += splitter.feed(wire[start : start + chunk])
    assert got == FRAMES
    assert splitter.pending == 0


def test_frame_splitter_holds_back_an_incomplete_frame() -> None:
    wire = protocol.encode_frame(FRAMES[0]) + protocol.encode_frame(FRAMES[1])
    splitter = protocol.FrameSplitter()
    assert splitter.feed(wire[:-1]) == [FRAMES[0]]
    assert splitter.pending == len(protocol.encode_frame(FRAMES[1])) - 1
    assert splitter.feed(wire[-1:]) == [FRAMES[1]]


def test_only_streamed_requests_ask_the_engine_for_per_token_deltas() -> None:
    from fleet.api.answers import engine_requests

    whole = engine_requests(plan(prompt=["a", "b"], n=2), "cmpl-1")
    streamed = engine_requests(plan(prompt="a", stream=True), "cmpl-2")
    assert [r.final_only for r in whole] == [True, True]
    assert [r.final_only for r in streamed] == [False]


def test_a_whole_choice_in_one_delta_folds_like_its_tokens_one_by_one() -> None:
    steps = [protocol.Delta(index=0, text=t, token_ids=[i], cumulative_logprob=-0.5 * (i + 1),
                            logprobs=[protocol.TokenLogprob(t, -0.5)], finish_reason="length" if i == 2 else None)
             for i, t in enumerate(["a", "b", "c"])]
    whole = protocol.Delta(index=0, text="abc", token_ids=[0, 1, 2], cumulative_logprob=-1.5,
                           logprobs=[protocol.TokenLogprob(t, -0.5) for t in "abc"], finish_reason="length")
    one_by_one, at_once = Candidate(), Candidate()
    for d in steps:
        one_by_one.add(d)
    at_once.add(whole)
    assert at_once == one_by_one
