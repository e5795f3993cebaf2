"""Engine output -> answers (fleet.api.answers, shaped by fleet.api.completions.serving): the engine
requests a plan makes, deltas folded into candidates, best_of's ranking, and logprobs objects.

The gateway's answers end to end, through fake engines and real clients, are in tests/gateway/test_app.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from fleet.api.answers import Candidate, PromptResult, best, engine_requests, open_stream
from fleet.api.completions.protocol import CompletionRequest
from fleet.api.completions.serving import CompletionShaper, completion_logprobs, plan_completion
from fleet.api.planning import Plan
from fleet.config.model import SamplingDefaults
from fleet.errors import FleetError
from fleet.wire import protocol


def plan(**fields: Any) -> Plan:
    """A /v1/completions request planned as the gateway plans it (JSON bytes -> CompletionRequest -> Plan)."""
    body = {"model": "m", "prompt": "Hello", **fields}
    return plan_completion(msgspec.json.decode(json.dumps(body).encode(), type=CompletionRequest), SamplingDefaults())


def candidate(text: str, cumulative: float) -> Candidate:
    return Candidate(text=text, cumulative_logprob=cumulative)


# --- engine requests ------------------------------------------------------------------------


def test_only_streamed_requests_ask_the_engine_for_per_token_deltas() -> None:
    whole = engine_requests(plan(prompt=["a", "b"], n=2), "cmpl-1")
    streamed = engine_requests(plan(prompt="a", stream=True), "cmpl-2")
    assert [r.final_only for r in whole] == [True, True]
    assert [r.final_only for r in streamed] == [False]


# --- deltas folded into candidates ----------------------------------------------------------


def test_candidate_accumulates_deltas() -> None:
    c = Candidate()
    c.add(protocol.Delta(index=0, text="Hel", token_ids=[1, 2], logprobs=[protocol.TokenLogprob("Hel", -0.1)],
                         cumulative_logprob=-0.1))
    c.add(protocol.Delta(index=0, text="lo", token_ids=[3], logprobs=[protocol.TokenLogprob("lo", -0.2)],
                         finish_reason="length", cumulative_logprob=-0.3))
    assert (c.text, c.tokens, c.finish_reason, c.cumulative_logprob) == ("Hello", 3, "length", -0.3)
    assert [e.token for e in c.logprobs or []] == ["Hel", "lo"]


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


# --- best_of's ranking ------------------------------------------------------------------------


def test_best_of_returns_the_n_highest_cumulative_logprob_candidates_best_first() -> None:
    cands = [candidate("a", -3.0), candidate("b", -0.5), candidate("c", -7.0), candidate("d", -1.0)]
    assert [c.text for c in best(cands, 2)] == ["b", "d"]
    assert [c.text for c in best(cands, 1)] == ["b"]


def test_best_of_with_no_more_candidates_than_n_keeps_them_all_in_order() -> None:
    cands = [candidate("a", -3.0), candidate("b", -0.5)]
    assert [c.text for c in best(cands, 2)] == ["a", "b"]


# --- logprobs objects -----------------------------------------------------------------------


def test_completion_logprobs_give_each_token_its_text_offset_and_top_alternatives() -> None:
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


# --- a fault of fleet's own in a stream ------------------------------------------------------


class OneAnswer:
    """A FrameSource whose engine answers each request with two tokens."""

    async def generate(self, req: protocol.GenerateRequest) -> Any:
        yield [protocol.Prompt(token_ids=[1, 2])]
        yield [protocol.Delta(index=0, text=" a", token_ids=[3])]
        yield [protocol.Delta(index=0, text=" b", token_ids=[4], finish_reason="length"),
               protocol.Done(prompt_tokens=2, completion_tokens=2)]

    def call(self, path: str, req: msgspec.Struct) -> Any:
        raise NotImplementedError

    def count_tokens(self, completion: int, prompt: int) -> None:
        pass


class Faulty(CompletionShaper):
    """The completions shaper with a bug of its own: in a delta, or in the stream's end."""

    def __init__(self, p: Plan, where: str) -> None:
        super().__init__(p, "m", "cmpl-1")
        self.where = where

    def delta(self, *args: Any) -> bytes:
        if self.where == "delta":
            raise ValueError("a bug")
        return super().delta(*args)

    async def end(self, results: list[PromptResult], failed: FleetError | None) -> bytes:
        if self.where == "end" and failed is None:
            raise RuntimeError("a bug")
        return await super().end(results, failed)


@pytest.mark.parametrize(("where", "kind"), [("delta", "ValueError"), ("end", "RuntimeError")])
def test_a_fault_of_fleets_own_after_the_stream_began_still_ends_it_with_an_error_event(
        where: str, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> list[bytes]:
        p = plan(stream=True, max_tokens=2)
        return [bytes(chunk) async for chunk in await open_stream(OneAnswer(), p, Faulty(p, where), "cmpl-1")]

    chunks = asyncio.run(body())
    events = [json.loads(line.removeprefix(b"data: ")) for line in b"".join(chunks).split(b"\n\n")
              if line.startswith(b"data: {")]
    assert events[-1]["error"]["message"] == f"internal error: {kind}" and events[-1]["error"]["type"] == "server_error"
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    assert any(r.exc_info and str(r.exc_info[1]) == "a bug" for r in caplog.records)  # its traceback is logged
