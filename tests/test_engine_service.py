"""The engine service's frames (fleet.engine.service), on vLLM-shaped outputs: fast extra tests
beside the end-to-end ones, which run the real engine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from fleet.engine.service import EngineService
from fleet.wire import protocol


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def service() -> EngineService:
    s = EngineService.__new__(EngineService)  # no vLLM engine: only the frame building is under test
    s.tokenizer = Tokenizer()
    return s


def output(**kw: Any) -> SimpleNamespace:
    logprob = SimpleNamespace(logprob=-0.5, decoded_token=" a")
    fields = dict(index=1, text=" a", token_ids=[7], logprobs=[{7: logprob}], finish_reason=None,
                  cumulative_logprob=-0.5)
    return SimpleNamespace(**{**fields, **kw})


def test_best_of_alone_gets_the_cumulative_logprob_without_per_token_logprobs() -> None:
    delta = service().delta(output(), per_token=False)
    assert delta == protocol.Delta(index=1, text=" a", token_ids=[7], logprobs=None, cumulative_logprob=-0.5)


def test_a_client_that_asks_for_logprobs_gets_them_per_token() -> None:
    delta = service().delta(output(), per_token=True)
    assert delta.logprobs == [protocol.TokenLogprob(" a", -0.5, [(" a", -0.5)])]
    assert delta.cumulative_logprob == -0.5
