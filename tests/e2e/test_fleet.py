"""End to end: the real launcher starts real vLLM CPU engines; real clients talk to the gateway.

What the gateway does whatever the engine (routing errors, the stream's framing, the model list,
the order of choices) is tests/gateway/test_app.py's, on fake engines; here, what needs the real
engine's output: real text, seeds, stop strings applied by vLLM, streaming against non-streaming."""

from __future__ import annotations

import itertools

import openai
import pytest
from fleets import Fleets


def test_default_model_answers_paris(default: openai.OpenAI) -> None:
    r = default.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.choices[0].text.startswith(" Paris")
    assert r.model == "smollm2"
    assert r.id.startswith("cmpl-")
    assert r.usage is not None and r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8
    assert r.choices[0].finish_reason == "length"


def test_requests_are_routed_by_model_name(tiny: openai.OpenAI) -> None:
    """Two models with different weights give different greedy text for the same prompt."""
    kw = dict(prompt="Hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    a1 = tiny.completions.create(model="tiny-a", **kw)
    a2 = tiny.completions.create(model="tiny-a", **kw)
    b = tiny.completions.create(model="tiny-b", **kw)
    assert a1.choices[0].text == a2.choices[0].text  # greedy is deterministic
    assert a1.choices[0].text != b.choices[0].text
    assert (a1.model, b.model) == ("tiny-a", "tiny-b")
    assert a1.usage.completion_tokens == b.usage.completion_tokens == 12


def test_same_seed_gives_same_output(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-b", prompt="Once upon a time", max_tokens=10, temperature=1.0)
    texts = {tiny.completions.create(seed=42, **kw).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_stop_string_ends_text_before_it(tiny: openai.OpenAI) -> None:
    full = tiny.completions.create(model="tiny-a", prompt="Hello", max_tokens=20, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:][:3]
    assert stop.strip(), full
    r = tiny.completions.create(model="tiny-a", prompt="Hello", max_tokens=20, temperature=0, stop=[stop],
                                extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(stop)]


def test_streaming_matches_non_streaming_and_ends_with_usage(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", prompt="Hello world", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = tiny.completions.create(**kw)
    chunks = list(tiny.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stream_interval_sends_a_streams_tokens_in_groups_after_the_first_and_the_same_text(tiny: openai.OpenAI) -> None:
    """tiny-b's engine_args = { stream_interval = 3 } (vLLM's opt-in): the first token alone, then
    three at a time; the text and the counts are those of the whole answer."""
    kw = dict(model="tiny-b", prompt="Hello world", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = tiny.completions.create(**kw)
    grouped = list(tiny.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    assert "".join(c.choices[0].text for c in grouped if c.choices) == whole.choices[0].text
    # [1, 4, 7, 10]; a busy machine may merge groups, the first with the next too (the gateway reads
    # what has arrived at once), never split one
    counts = [c.usage.completion_tokens for c in grouped if c.choices]
    assert counts[0] % 3 == 1 and counts[-1] == 10 and all((b - a) % 3 == 0 for a, b in itertools.pairwise(counts))
    assert grouped[-1].usage.completion_tokens == 10 and grouped[-2].choices[0].finish_reason == "length"


def test_continuous_usage_stats_puts_each_choices_tokens_so_far_in_every_chunk(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", prompt=["Hello world", "Hi"], max_tokens=6, n=2, temperature=1.0, seed=3,
              extra_body={"ignore_eos": True})
    chunks = list(tiny.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    *deltas, final = chunks
    last: dict[int, int] = {}
    prompt_tokens = {}
    for c in deltas:  # vLLM's rule: the choice's completion tokens so far, its prompt's tokens
        (choice,) = c.choices
        assert c.usage.completion_tokens > last.get(choice.index, 0)
        last[choice.index] = c.usage.completion_tokens
        prompt_tokens[choice.index // 2] = c.usage.prompt_tokens
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    assert last == {0: 6, 1: 6, 2: 6, 3: 6}
    assert final.choices == [] and final.usage.completion_tokens == 24
    assert final.usage.prompt_tokens == sum(prompt_tokens.values())  # each prompt once, as vLLM counts
    plain = list(tiny.completions.create(stream=True, stream_options={"continuous_usage_stats": True}, **kw))
    assert all(c.usage is None for c in plain)  # without include_usage it does nothing (vLLM's rule)


def test_prompt_longer_than_context_is_400_naming_max_tokens(tiny: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny-a", prompt="Hello", max_tokens=600)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny-a", prompt="Hello " * 600, max_tokens=5)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:  # a chat names its messages
        tiny.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hello " * 600}], max_tokens=5)
    assert e.value.body["param"] == "messages" and "fills the model's context of 512" in e.value.body["message"]


def test_langchain_openai_llm_generates_for_each_prompt(fleets: Fleets, tiny: openai.OpenAI) -> None:
    from langchain_openai import OpenAI as LangChainOpenAI

    llm = LangChainOpenAI(model="tiny-b", base_url=fleets.ready("tiny").url + "/v1", api_key="x",
                          max_tokens=6, temperature=0, max_retries=0)
    result = llm.generate(["Hello", "The capital of"])
    assert len(result.generations) == 2
    assert all(g[0].text for g in result.generations)
    assert result.llm_output["token_usage"]["completion_tokens"] > 0
