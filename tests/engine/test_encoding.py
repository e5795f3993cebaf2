"""The engine's text -> ids (fleet.engine.encoding): the Rust backend alone, giving what
transformers' encode gives, on the tiny model's real BPE tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_model import EOS
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from fleet.engine.encoding import encoder

TEXTS = ["Write a short story about a robot number 7 who learns to paint.", "", " leading and trailing ",
         "lines\n\nand\ttabs", "naïve café — 東京 🚀", "<|endoftext|> inside the text <|endoftext|>", "word " * 300]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


def test_encoder_gives_the_ids_transformers_gives_through_the_backend_alone(tokenizer: Any) -> None:
    encode = encoder(tokenizer)
    assert encode.__name__ == "through_backend"
    for text in TEXTS:
        for special in (True, False):
            assert encode(text, special) == tokenizer.encode(text, add_special_tokens=special), (text, special)


def test_encoder_ignores_truncation_and_padding_left_on_the_backend(tokenizer: Any) -> None:
    """transformers resets its backend's truncation and padding before each call; the encoder's own
    copy never truncates or pads, whatever the tokenizer's backend was left with."""
    encode = encoder(tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(4)
    tokenizer.backend_tokenizer.enable_padding(length=64)
    try:
        long = TEXTS[-1]
        assert encode(long, True) == tokenizer.encode(long) and len(encode(long, True)) > 64
    finally:
        tokenizer.backend_tokenizer.no_truncation()
        tokenizer.backend_tokenizer.no_padding()


def test_encoder_adds_special_tokens_as_the_tokenizer_does(tiny_model: Path) -> None:
    """A backend whose post-processor adds a BOS: with add_special_tokens the ids begin with it, without, not."""
    from tokenizers import processors

    tok = AutoTokenizer.from_pretrained(tiny_model)
    bos = tok.convert_tokens_to_ids(EOS)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{EOS} $A", special_tokens=[(EOS, bos)])
    encode = encoder(tok)
    assert encode.__name__ == "through_backend"
    assert encode("hello", True)[0] == bos and encode("hello", True) == tok.encode("hello")
    assert encode("hello", False) == tok.encode("hello", add_special_tokens=False) and bos not in encode("hello", False)


def test_encoder_keeps_transformers_when_the_tokenizer_adds_in_python(tiny_model: Path) -> None:
    """A tokenizer whose encode does more than its backend (here: a prefix id) keeps its own encode."""

    class Prefixed(PreTrainedTokenizerFast):
        def encode(self, text: Any, *args: Any, **kwargs: Any) -> list[int]:  # type: ignore[override]
            return [3, *super().encode(text, *args, **kwargs)]

    tok = Prefixed.from_pretrained(tiny_model)
    encode = encoder(tok)
    assert encode.__name__ == "through_transformers"
    assert encode("hello", True) == tok.encode("hello") and encode("hello", True)[0] == 3


def test_encoder_uses_transformers_for_a_tokenizer_without_a_backend() -> None:
    class Slow:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [len(text), int(add_special_tokens)]

    encode = encoder(Slow())
    assert encode("abc", True) == [3, 1] and encode("abc", False) == [3, 0]
