"""A continuation's text on the engine (fleet/engine/resume.py), against vLLM's own streaming
detokenizer run over the whole answer: what the client gets before the seam plus what the
continuation sends is the undisturbed stream's text, wherever the seam falls, with random token ids
(bytes of unfinished characters included) and with a stop string across the seam."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fleet.engine.resume import Continued


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def params(stop: list[str] | None = None) -> Any:
    from vllm import SamplingParams

    return SamplingParams(max_tokens=100, stop=stop)


def undisturbed(tokenizer: Any, prompt: list[int], tokens: list[int], stop: list[str] | None = None) -> list[str]:
    """The text vLLM streams for each token, up to a stop string."""
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer

    d = IncrementalDetokenizer.from_new_request(tokenizer, SimpleNamespace(
        request_id="u", prompt_token_ids=prompt, sampling_params=params(stop)))
    pieces = []
    for k, t in enumerate(tokens):
        stopped = d.update([t], False) is not None
        pieces.append(d.get_next_output_text(stopped or k == len(tokens) - 1, True))
        if stopped:
            break
    return pieces


def continued(tokenizer: Any, prompt: list[int], tokens: list[int], seam: int, sent: str,
              stop: list[str] | None = None) -> tuple[str, bool]:
    c = Continued(tokenizer, params(stop), prompt, tokens[:seam], len(sent), "c")
    text, stopped = "", False
    for k, t in enumerate(tokens[seam:], start=seam):
        piece, stopped = c.feed([t], "length" if k == len(tokens) - 1 else None)
        text += piece
        if stopped:
            break
    return text, stopped


def test_the_text_across_any_seam_is_the_undisturbed_streams(tokenizer: Any) -> None:
    rng = random.Random(5)
    prompt = tokenizer.encode("The capital of France is")
    tokens = [rng.randrange(len(tokenizer)) for _ in range(40)]
    pieces = undisturbed(tokenizer, prompt, tokens)
    for seam in range(1, len(tokens)):
        sent = "".join(pieces[:seam])
        rest, _ = continued(tokenizer, prompt, tokens, seam, sent)
        assert sent + rest == "".join(pieces), seam


def test_a_stop_string_across_the_seam_ends_the_answer_before_it(tokenizer: Any) -> None:
    prompt = tokenizer.encode("Hello")
    tokens = tokenizer.encode(" one two three four five six seven")
    whole = "".join(undisturbed(tokenizer, prompt, tokens))
    stop = "hree fo"
    expected = undisturbed(tokenizer, prompt, tokens, [stop])
    assert "".join(expected) == whole[: whole.index(stop)]
    seam = len(tokenizer.encode(" one two th"))  # the seam inside the stop string
    sent = "".join(expected[:seam])
    rest, stopped = continued(tokenizer, prompt, tokens, seam, sent, [stop])
    assert stopped and sent + rest == "".join(expected)
    assert sent == " one two"  # "th" was held back: it might have begun the stop string
