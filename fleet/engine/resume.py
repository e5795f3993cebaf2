"""The text of a request taken over from a replica that died (`protocol.Resume`), as the undisturbed
request would have streamed it.

A continuation is a new request to vLLM whose prompt ends with the tokens already generated. vLLM
would detokenize its output as text following that prompt, which is not always the text the first
engine was sending: its detokenizer held back what might begin a stop string and the bytes of an
unfinished character, and matches stop strings only within one request's output. So the engine
asks vLLM for no stop strings and makes the text itself with vLLM's own incremental detokenizer,
primed with the original prompt and fed the tokens generated before (what the dead engine's was),
then each new token: the text held back comes first, stop strings match across the seam, and
nothing the client has is sent again.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any


class Continued:
    """One continuation's text: fed each step's new token ids, it says what to send and whether a
    stop string ended the answer (the text then ends before it, vLLM's rule)."""

    def __init__(self, tokenizer: Any, params: Any, prompt: list[int], generated: list[int], text_sent: int,
                 request_id: str) -> None:
        """`params`: vLLM SamplingParams with the original request's stop strings and min_tokens."""
        from vllm.v1.engine.detokenizer import IncrementalDetokenizer

        original = SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, sampling_params=params)
        self.detokenizer = IncrementalDetokenizer.from_new_request(tokenizer, original)
        self.detokenizer.update(generated, False)  # the dead engine's tokens, as it read them
        self.held = self.detokenizer.get_next_output_text(False, True)[text_sent:]  # what it had not sent

    def feed(self, token_ids: list[int], finish_reason: str | None) -> tuple[str, bool]:
        """The text to send for this step's tokens (those a stop token ended excepted, as vLLM), and
        whether a stop string was found."""
        stop = self.detokenizer.update(list(token_ids), finish_reason == "stop")
        text = self.held + self.detokenizer.get_next_output_text(finish_reason is not None or stop is not None, True)
        self.held = ""
        return text, stop is not None
