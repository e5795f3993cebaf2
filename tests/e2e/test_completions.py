"""/v1/completions, every parameter, against real vLLM CPU engines (the tiny fleet, float32).

Values are checked, not only shapes: logprobs against the same weights run by transformers,
best_of winners against all candidates, beam search against an exhaustive search and an
independent step-by-step reference.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

NO_EOS = {"ignore_eos": True}


class Reference:
    """The tiny model in transformers (float32): exact next-token log-probabilities."""

    def __init__(self, path: Path) -> None:
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos = self.tok.eos_token_id

    @torch.no_grad()
    def next_logprobs(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids])).logits[0, -1].double(), -1)

    @torch.no_grad()
    def next_logprobs_batch(self, seqs: list[list[int]]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor(seqs)).logits[:, -1].double(), -1)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def ref(tiny_model: Path) -> Reference:
    return Reference(tiny_model)


def reference_beam_search(
    ref: Reference, prompt: list[int], width: int, max_tokens: int, length_penalty: float,
    early_stopping: bool | str, stop: list[str], max_model_len: int = 512,
) -> list[tuple[str, float]]:
    """vLLM 0.2.7's beam search written out plainly: (text, cumulative logprob), best first."""

    def score(toks: list[int], cum: float, seq_len: int | None = None) -> float:
        if seq_len is None:
            seq_len = len(prompt) + len(toks) - (1 if toks and toks[-1] == ref.eos else 0)
        return cum / seq_len**length_penalty

    running: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float, str]] = []
    while running:
        cands = []
        for b, (toks, cum) in enumerate(running):
            lp = ref.next_logprobs(prompt + toks)
            for t in torch.topk(lp, 2 * width).indices.tolist():
                cands.append((cum + lp[t].item(), b, t))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        alive = []
        for cum, b, t in cands[: 2 * width]:
            toks = running[b][0] + [t]
            text = ref.decode(toks)
            hits = [i for i in (text.find(s) for s in stop) if i >= 0]
            if t == ref.eos or hits or len(toks) >= max_tokens:
                finished.append((toks, cum, text[: min(hits)] if hits else text))
            else:
                alive.append((toks, cum))
        finished.sort(key=lambda f: score(f[0], f[1]), reverse=True)
        finished = finished[:width]
        alive.sort(key=lambda a: score(*a), reverse=True)
        if not alive:
            break
        if len(finished) >= width:
            worst = score(finished[width - 1][0], finished[width - 1][1])
            best_toks, best_cum = alive[0]
            if early_stopping is True:
                break
            if early_stopping == "never" and length_penalty > 0:
                best = score(best_toks, best_cum, seq_len=max(len(prompt) + max_tokens, max_model_len))
            else:
                best = score(best_toks, best_cum)
            if worst >= best:
                break
        running = alive[:width]
    return [(text, cum) for _, cum, text in finished]


def beam(tiny: openai.OpenAI, prompt: str, **kw: object) -> openai.types.Completion:
    extra = {"use_beam_search": True, **{k: kw.pop(k) for k in ("length_penalty", "early_stopping", "ignore_eos") if k in kw}}
    return tiny.completions.create(model="tiny-a", prompt=prompt, temperature=0, extra_body=extra, **kw)  # type: ignore[arg-type]


# --- beam search --------------------------------------------------------------------------


def test_beam_search_two_steps_is_the_exhaustive_best_over_its_search_space(tiny: openai.OpenAI, ref: Reference) -> None:
    """With 2 tokens, width W keeps the W best first tokens; among all W x vocab continuations
    of those, the n returned are exactly the n with the highest cumulative logprob."""
    prompt = ref.encode("The capital of")
    width, n = 3, 3
    first = ref.next_logprobs(prompt)
    firsts = torch.topk(first, width).indices.tolist()
    second = ref.next_logprobs_batch([[*prompt, t] for t in firsts])
    every = [(first[a].item() + second[i, b].item(), a, b) for i, a in enumerate(firsts) for b in range(second.shape[1])]
    every.sort(reverse=True)
    expected = [(ref.decode([a, b]), cum) for cum, a, b in every[:n]]

    r = beam(tiny, "The capital of", n=n, best_of=width, max_tokens=2, length_penalty=0.0, ignore_eos=True, logprobs=0)
    got = [(c.text, sum(c.logprobs.token_logprobs)) for c in r.choices]
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-3)


def test_beam_search_one_step_returns_the_n_most_likely_tokens(tiny: openai.OpenAI, ref: Reference) -> None:
    lp = ref.next_logprobs(ref.encode("Hello"))
    expected = [ref.decode([t]) for t in torch.topk(lp, 4).indices.tolist()]
    r = beam(tiny, "Hello", n=4, best_of=4, max_tokens=1, ignore_eos=True)
    assert [c.text for c in r.choices] == expected


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5, 2.0])
def test_beam_search_matches_the_reference_with_stops(
    tiny: openai.OpenAI, ref: Reference, early_stopping: bool | str, length_penalty: float
) -> None:
    """Stop strings end beams at different lengths, so early_stopping and length_penalty matter."""
    stop = ["a", "o"]
    expected = reference_beam_search(ref, ref.encode("Hello world"), 4, 8, length_penalty, early_stopping, stop)
    r = beam(tiny, "Hello world", n=2, best_of=4, max_tokens=8, stop=stop, length_penalty=length_penalty,
             early_stopping=early_stopping, logprobs=1)
    assert [c.text for c in r.choices] == [t for t, _ in expected[:2]]
    for c, (_, cum) in zip(r.choices, expected, strict=False):  # the n best of best_of
        assert sum(c.logprobs.token_logprobs) == pytest.approx(cum, abs=1e-3)
        assert c.index in (0, 1)


def test_beam_search_is_deterministic_and_respects_max_tokens(tiny: openai.OpenAI) -> None:
    runs = [beam(tiny, "Once upon a time", n=3, best_of=5, max_tokens=6, ignore_eos=True) for _ in range(2)]
    assert [c.text for c in runs[0].choices] == [c.text for c in runs[1].choices]
    assert all(c.finish_reason == "length" for c in runs[0].choices)
    assert runs[0].usage.completion_tokens == 3 * 6


def test_beam_search_through_langchain_vllm_openai(fleets, ref: Reference) -> None:
    from langchain_community.llms import VLLMOpenAI

    llm = VLLMOpenAI(
        openai_api_base=fleets.ready("tiny").url + "/v1", openai_api_key="x", model_name="tiny-a",
        max_tokens=1, temperature=0,
        model_kwargs={"extra_body": {"use_beam_search": True, "best_of": 3, "ignore_eos": True}},
    )
    lp = ref.next_logprobs(ref.encode("Hello"))
    assert llm.invoke("Hello") == ref.decode([int(torch.argmax(lp))])


# --- best_of, logprobs, echo ----------------------------------------------------------------


def test_logprobs_agree_with_the_model(tiny: openai.OpenAI, ref: Reference) -> None:
    r = tiny.completions.create(model="tiny-a", prompt="Hello world", max_tokens=5, temperature=0, logprobs=3,
                                extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    ids = ref.encode("Hello world")
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        expected = ref.next_logprobs(ids)
        chosen = int(torch.argmax(expected))
        assert value == pytest.approx(expected[chosen].item(), abs=1e-3)
        if not ref.decode([chosen]).endswith("\ufffd"):
            assert token == ref.decode([chosen])
        # else a piece of a character (a byte token): vLLM reports "" for it and gives the whole
        # character to the token that completes it
        assert 1 <= len(top) <= 4 and max(top.values()) == pytest.approx(value, abs=1e-3)
        ids.append(chosen)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_best_of_returns_n_highest_cumulative_logprob(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-b", prompt="Once upon", max_tokens=6, temperature=1.0, seed=11, logprobs=0, extra_body=NO_EOS)
    everyone = tiny.completions.create(n=5, **kw)
    winners = tiny.completions.create(n=2, best_of=5, **kw)
    ranked = sorted(everyone.choices, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in winners.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in winners.choices] == [0, 1]


def test_best_of_through_langchain_openai(fleets) -> None:
    from langchain_openai import OpenAI as LangChainOpenAI

    llm = LangChainOpenAI(model="tiny-a", base_url=fleets.ready("tiny").url + "/v1", api_key="x",
                          max_tokens=4, temperature=0.8, best_of=3, max_retries=0)
    result = llm.generate(["Hello", "Once"])
    assert [len(g) for g in result.generations] == [1, 1]


def test_echo_puts_the_prompt_and_its_logprobs_first(tiny: openai.OpenAI, ref: Reference) -> None:
    r = tiny.completions.create(model="tiny-a", prompt="Hello world", max_tokens=3, temperature=0, echo=True,
                                logprobs=1, extra_body=NO_EOS)
    c = r.choices[0]
    assert c.text.startswith("Hello world")
    n_prompt = len(ref.encode("Hello world"))
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    second = ref.next_logprobs(ref.encode("Hello world")[:1])[ref.encode("Hello world")[1]].item()
    assert c.logprobs.token_logprobs[1] == pytest.approx(second, abs=1e-3)
    assert len(c.logprobs.tokens) == n_prompt + 3
    assert "".join(c.logprobs.tokens[:n_prompt]) == "Hello world"


def test_echo_streams_the_prompt_first(tiny: openai.OpenAI) -> None:
    chunks = list(tiny.completions.create(model="tiny-a", prompt="Hi there", max_tokens=2, echo=True, stream=True))
    assert chunks[0].choices[0].text.startswith("Hi there")


# --- prompt forms, context, defaults ----------------------------------------------------------


def test_token_id_prompts_equal_text_prompts(tiny: openai.OpenAI, ref: Reference) -> None:
    ids = ref.encode("Hello world")
    kw = dict(model="tiny-a", max_tokens=4, temperature=0, extra_body=NO_EOS)
    text = tiny.completions.create(prompt="Hello world", **kw).choices[0].text
    assert tiny.completions.create(prompt=ids, **kw).choices[0].text == text
    both = tiny.completions.create(prompt=[ids, ids], **kw)
    assert [c.text for c in both.choices] == [text, text]


def test_out_of_vocabulary_token_id_is_400(tiny: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny-a", prompt=[1, 99999], max_tokens=2)
    assert e.value.body["param"] == "prompt"


TOKEN_ID_FIELDS = [
    ("logit_bias", lambda ids: {str(i): 1 for i in ids}),
    ("stop_token_ids", list),
    ("allowed_token_ids", list),
]


def replica_errors(url: str, replica: str) -> int:
    return next(r["errors"] for r in httpx.get(f"{url}/fleet/status", timeout=10).json()["models"]
                if r["replica"] == replica)


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("field", "shape"), TOKEN_ID_FIELDS, ids=[f for f, _ in TOKEN_ID_FIELDS])
def test_out_of_vocabulary_ids_in_a_token_id_field_are_a_400_naming_it_and_no_replica_error(
        fleets, field: str, shape, stream: bool, route: str) -> None:
    url = fleets.ready("tiny").url
    before = replica_errors(url, "tiny-a")
    body = {"model": "tiny-a", "max_tokens": 4, "stream": stream, field: shape([100000, 5])}
    body |= {"prompt": "hello"} if route == "completions" else {"messages": [{"role": "user", "content": "hello"}]}
    r = httpx.post(f"{url}/v1/{'chat/' if route == 'chat' else ''}completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error"
    assert "token id 100000 is out of the vocabulary" in error["message"]
    assert replica_errors(url, "tiny-a") == before  # a client's mistake is not the replica's


def test_a_hundred_thousand_bad_token_ids_get_a_short_message(fleets) -> None:
    url = fleets.ready("tiny").url
    bias = {str(100000 + i): 1 for i in range(100_000)}
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-a", "prompt": "hello", "max_tokens": 4,
                                                  "logit_bias": bias}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    assert "100,000 token ids (100000, 100001, 100002, 100003, 100004 and 99,995 more)" in r.json()["error"]["message"]
    assert len(r.content) < 1000


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("field", "value"), [("allowed_token_ids", [0]), ("bad_words", ["a"])])
def test_a_ban_that_leaves_the_structured_outputs_no_token_is_a_400_naming_it_and_no_replica_error(
        fleets, field: str, value: list, stream: bool) -> None:
    url = fleets.ready("tiny").url
    before = replica_errors(url, "tiny-a")
    body = {"model": "tiny-a", "prompt": "a", "max_tokens": 4, "stream": stream,
            "structured_outputs": {"regex": "a"}, field: value}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)  # the first token is refused: a 400, also streamed
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert "no token they accept" in r.json()["error"]["message"]
    assert replica_errors(url, "tiny-a") == before  # the request's own contradiction, not the replica's fault


def test_an_empty_prompt_the_tokenizer_adds_nothing_to_is_a_400_naming_prompt(tiny: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny-a", prompt="", max_tokens=2)
    assert e.value.param == "prompt" and "encodes to no tokens" in e.value.message


def test_allowed_token_ids_are_the_only_tokens_sampled(tiny: openai.OpenAI, ref: Reference) -> None:
    token = ref.encode(" Paris")[0]
    r = tiny.completions.create(model="tiny-a", prompt="Hello", max_tokens=6, temperature=1.0, seed=1,
                                extra_body={**NO_EOS, "allowed_token_ids": [token]})
    assert r.choices[0].text == ref.decode([token] * 6)


def test_bad_words_are_never_generated(tiny: openai.OpenAI, ref: Reference) -> None:
    kw = dict(model="tiny-a", prompt="Hello", max_tokens=6, temperature=0, logprobs=0)
    plain = tiny.completions.create(**kw, extra_body=NO_EOS).choices[0]
    first = plain.logprobs.tokens[0]
    banned = tiny.completions.create(**kw, extra_body={**NO_EOS, "bad_words": [first.strip() or first]}).choices[0]
    assert banned.logprobs.tokens[0] != first


def test_unset_max_tokens_defaults_to_16_and_shrinks_to_the_context(tiny: openai.OpenAI) -> None:
    r = tiny.completions.create(model="tiny-a", prompt="Hello", temperature=0, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 16
    long_prompt = [5] * 505  # 512-token context: room for 7
    r = tiny.completions.create(model="tiny-a", prompt=long_prompt, temperature=0, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


# --- sampling parameters that change the text ------------------------------------------------


def test_logit_bias_forces_a_token(tiny: openai.OpenAI, ref: Reference) -> None:
    token = ref.encode(" world")[0]
    r = tiny.completions.create(model="tiny-a", prompt="Hello", max_tokens=4, temperature=0,
                                logit_bias={str(token): 100}, extra_body=NO_EOS)
    assert r.choices[0].text == ref.decode([token] * 4)


def test_stop_token_ids_and_min_tokens(tiny: openai.OpenAI, ref: Reference) -> None:
    kw = dict(model="tiny-a", prompt="Hello", max_tokens=8, temperature=0)
    greedy = ref.encode("Hello")  # the greedy answer's token ids, from the reference model
    for _ in range(8):
        greedy.append(int(torch.argmax(ref.next_logprobs(greedy))))
    answer = greedy[-8:]
    # the first token of the answer not sampled before it: stopping on it ends the answer there
    at = next(i for i in range(1, 8) if answer[i] not in answer[:i])
    r = tiny.completions.create(**kw, extra_body={**NO_EOS, "stop_token_ids": [answer[at]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == at + 1
    r = tiny.completions.create(**kw, extra_body={**NO_EOS, "stop_token_ids": [answer[at]], "min_tokens": 5})
    assert r.usage.completion_tokens >= 5


def test_penalties_change_greedy_text(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", prompt="Hello world", max_tokens=24, temperature=0, extra_body=NO_EOS)
    plain = tiny.completions.create(**kw).choices[0].text
    assert tiny.completions.create(frequency_penalty=2.0, **kw).choices[0].text != plain or \
        tiny.completions.create(presence_penalty=2.0, **kw).choices[0].text != plain
    rep = tiny.completions.create(**{**kw, "extra_body": {**NO_EOS, "repetition_penalty": 2.0}}).choices[0].text
    assert rep != plain


def test_top_k_one_is_greedy(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-b", prompt="Hello", max_tokens=8, extra_body=NO_EOS)
    greedy = tiny.completions.create(temperature=0, **kw).choices[0].text
    sampled = tiny.completions.create(temperature=1.0, seed=5, **{**kw, "extra_body": {**NO_EOS, "top_k": 1}})
    assert sampled.choices[0].text == greedy


def test_min_p_and_top_p_accepted(tiny: openai.OpenAI) -> None:
    r = tiny.completions.create(model="tiny-b", prompt="Hello", max_tokens=4, temperature=0.7, top_p=0.9,
                                user="someone", extra_body={"min_p": 0.05})
    assert r.choices[0].finish_reason in ("stop", "length")


def test_rules_are_checked_before_the_engine(tiny: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny-a", prompt="Hi", temperature=0.5, extra_body={"use_beam_search": True, "best_of": 2})
    assert e.value.body["param"] == "temperature"
    assert "temperature must be 0 when using beam search" in e.value.body["message"]


def test_streamed_n_gives_every_choice_its_finish(tiny: openai.OpenAI) -> None:
    chunks = list(tiny.completions.create(model="tiny-a", prompt=["Hello", "Once"], n=2, max_tokens=3,
                                          temperature=1.0, seed=3, stream=True, extra_body=NO_EOS))
    finishes = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finishes == {0: "length", 1: "length", 2: "length", 3: "length"}
    texts: dict[int, str] = {}
    for c in chunks:
        texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
    assert all(texts.values())


def test_min_tokens_above_the_default_max_tokens_is_400_naming_min_tokens(tiny: openai.OpenAI) -> None:
    """No max_tokens: the default (16) applies, and min_tokens may not exceed it; said before the engine."""
    with pytest.raises(openai.BadRequestError) as e:
        tiny.completions.create(model="tiny-a", prompt="Hello", extra_body={"min_tokens": 20})
    assert e.value.body["param"] == "min_tokens" and "default max_tokens (16)" in e.value.body["message"]


def test_min_tokens_beyond_the_room_the_context_leaves_is_400_naming_min_tokens(tiny: openai.OpenAI) -> None:
    """Chat's default max_tokens is the room left; min_tokens beyond it is the engine's 400, naming it."""
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="tiny-a", messages=[{"role": "user", "content": "Hello"}],
                                     extra_body={"min_tokens": 600})
    assert e.value.body["param"] == "min_tokens" and "context" in e.value.body["message"]


def test_a_repeated_prompt_reports_the_tokens_vllm_s_prefix_cache_held(tiny: openai.OpenAI) -> None:
    prompt = [100 + (i * 37) % 300 for i in range(300)]  # no other test sends it: the first time, nothing is cached
    first = tiny.completions.create(model="tiny-a", prompt=prompt, max_tokens=1)
    assert first.usage is not None and first.usage.prompt_tokens == 300
    assert first.usage.prompt_tokens_details is not None and first.usage.prompt_tokens_details.cached_tokens == 0
    again = tiny.completions.create(model="tiny-a", prompt=prompt, max_tokens=1)
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert 128 <= again.usage.prompt_tokens_details.cached_tokens < 300  # whole blocks, the last token computed
    chunks = list(tiny.completions.create(model="tiny-a", prompt=prompt, max_tokens=1, stream=True,
                                          stream_options={"include_usage": True}))
    final = chunks[-1].usage
    assert final is not None and final.prompt_tokens_details is not None
    assert final.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
