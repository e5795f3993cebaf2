"""Request -> plan (fleet.api.planning) under the sampling rules (fleet.api.rules): the rules that
always apply, beam search's and greedy's, the precedence of defaults (the client's value -> the
model's default -> OpenAI's), what best_of and logprobs ask of the engine, and the prompt forms.

Requests are built the way the gateway builds them: JSON bytes decoded into CompletionRequest.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from fleet.api.completions.protocol import CompletionRequest
from fleet.api.completions.serving import plan_completion
from fleet.api.planning import Plan
from fleet.api.rules import SamplingType, sampling_type
from fleet.config.model import Limits, SamplingDefaults
from fleet.errors import InvalidRequest
from fleet.wire import protocol


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


def test_include_usage_is_accepted_with_stream() -> None:
    p = plan(stream=True, stream_options={"include_usage": True})
    assert (p.stream, p.include_usage, p.continuous_usage) == (True, True, False)


def test_continuous_usage_stats_needs_include_usage() -> None:
    both = {"include_usage": True, "continuous_usage_stats": True}
    assert plan(stream=True, stream_options=both).continuous_usage is True
    assert plan(stream=True, stream_options={"continuous_usage_stats": True}).continuous_usage is False


def test_empty_stop_string_is_invalid() -> None:
    rejected("stop", "empty", stop="")
    rejected("stop", "empty", stop=["\n", ""])


def test_stop_sequences_and_bad_words_are_bounded_by_the_models_limits() -> None:
    """The engine searches the text for every stop sequence after each token, and checks every bad
    word at each step of the whole batch: a hostile list would slow every stream of the engine."""
    limits = Limits()  # a model's defaults: 64 stop sequences, 16 bad words
    assert plan_completion(request(stop=[f"s{i}" for i in range(64)]), SamplingDefaults(), limits).sampling.stop[-1] == "s63"
    with pytest.raises(InvalidRequest, match="at most 64 stop sequences for this model, got 65") as e:
        plan_completion(request(stop=[f"s{i}" for i in range(65)]), SamplingDefaults(), limits)
    assert e.value.param == "stop"
    assert len(plan_completion(request(bad_words=["w"] * 16), SamplingDefaults(), limits).sampling.bad_words) == 16
    with pytest.raises(InvalidRequest, match="at most 16 bad_words for this model, got 100000") as e:
        plan_completion(request(bad_words=["w"] * 100_000), SamplingDefaults(), limits)
    assert e.value.param == "bad_words"
    tight = Limits(stop=1, bad_words=0)
    with pytest.raises(InvalidRequest, match="at most 1 stop"):
        plan_completion(request(stop=["a", "b"]), SamplingDefaults(), tight)
    with pytest.raises(InvalidRequest, match="at most 0 bad_words"):
        plan_completion(request(bad_words=["a"]), SamplingDefaults(), tight)


def test_stop_may_be_a_string_a_list_or_null() -> None:
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


def test_suffix_is_refused_as_unsupported() -> None:
    rejected("suffix", "suffix is not supported", suffix="def f():")


def test_structured_outputs_json_nested_deeper_than_the_bound_is_a_400_as_an_object_or_as_text() -> None:
    schema: Any = {"type": "string"}
    for _ in range(32):  # 65 levels: each object and its "properties", and the string's schema
        schema = {"type": "object", "properties": {"a": schema}}
    rejected("structured_outputs.json", "deeper than 64 levels", structured_outputs={"json": schema})
    rejected("structured_outputs.json", "deeper than 64 levels", structured_outputs={"json": json.dumps(schema)})
    text = "[" * 5000 + "]" * 5000  # beyond the decoder's recursion: refused, never a 500
    rejected("structured_outputs.json", "JSON Schema", structured_outputs={"json": text})
    assert plan(structured_outputs={"json": schema["properties"]["a"]}).sampling.structured is not None
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(513)}}
    rejected("structured_outputs.json", "more than 512 properties", structured_outputs={"json": wide})
    rejected("structured_outputs.json", "more than 512 properties", structured_outputs={"json": json.dumps(wide)})


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
def test_beam_search_takes_early_stopping_true_false_or_never(early_stopping: bool | str) -> None:
    p = plan(use_beam_search=True, best_of=3, early_stopping=early_stopping, length_penalty=0.5)
    assert p.beam == protocol.BeamSearch(width=3, length_penalty=0.5, early_stopping=early_stopping)


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


def test_seed_min_tokens_ignore_eos_and_stop_token_ids_pass_through() -> None:
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
def test_every_prompt_form_becomes_a_list_of_prompts(prompt: Any, prompts: list[Any]) -> None:
    assert plan(prompt=prompt).prompts == prompts


def test_min_tokens_above_the_default_max_tokens_is_refused_naming_min_tokens() -> None:
    with pytest.raises(InvalidRequest) as e:
        plan(min_tokens=20)  # completions' default max_tokens is 16
    assert e.value.param == "min_tokens" and "default max_tokens (16)" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        plan(SamplingDefaults(max_tokens=8), min_tokens=10)  # the model's default counts as well
    assert e.value.param == "min_tokens" and "(8)" in e.value.message
    assert plan(SamplingDefaults(max_tokens=64), min_tokens=20).sampling.min_tokens == 20


def test_every_unset_field_takes_its_default_from_the_one_table() -> None:
    p = plan()
    s = p.sampling
    assert (p.n, s.n, p.echo, p.stream, p.include_usage) == (1, 1, False, False, False)
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.min_tokens, s.ignore_eos) == (1.0, 1.0, -1, 0.0, 0, False)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.max_tokens) == (0.0, 0.0, 1.0, 16)
    beam = plan(use_beam_search=True, best_of=2).beam
    assert beam == protocol.BeamSearch(width=2, length_penalty=1.0, early_stopping=False)
