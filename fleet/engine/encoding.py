"""Text -> token ids in the engine process, on the request's path.

transformers' ``encode`` wraps one call of a fast tokenizer's Rust backend in Python that costs
more than the call itself (~100 us against ~45 us for a 15-token prompt on a 2-core VM): at 256
streams a wave of new requests is admitted one after another on the engine's event loop, so this
is time each of them waits before its first token. ``encoder`` makes that one call directly, set
up as transformers sets it up before each of its calls, and keeps transformers' ``encode`` for
any tokenizer where the two might differ.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Encode = Callable[[str, bool], list[int]]

# Checked both ways at start: plain words, spaces and new lines, non-ASCII text, digits and code.
PROBES = ("Hello, world!", "  two  spaces\nand a new line\n\n", "naïve café — 東京 🚀", "x = 1234567 + 0.5;", "")


def encoder(tokenizer: Any) -> Encode:
    """`encode(text, add_special_tokens)`: the ids `tokenizer.encode` gives, through the Rust backend
    alone where the tokenizer has one and both agree on the probes (special tokens included)."""

    def through_transformers(text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode"):
        return through_transformers  # a slow (Python) tokenizer, or a tokenizer mode of vLLM's own
    # a copy of our own: transformers sets truncation, padding and special-token splitting on its
    # backend before each call; this one is set once, as a plain encode() sets them
    backend = copy.deepcopy(backend)
    backend.no_truncation()
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    def through_backend(text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = backend.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    probes = [*PROBES, *(str(t) for t in getattr(tokenizer, "all_special_tokens", [])[:8])]
    probes.append(" ".join(probes))
    agree = all(through_backend(text, special) == through_transformers(text, special)
                for text in probes for special in (True, False))
    return through_backend if agree else through_transformers
