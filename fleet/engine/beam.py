"""Classic beam search (vLLM 0.2.7 semantics, after Hugging Face's BeamSearchScorer), on the engine.

Current vLLM has no such beam search: it keeps `n` as the width, runs every step to
max_tokens and ignores stop strings. fleet runs it step-wise on top of the engine:

- each step asks vLLM for one token per running beam, with the top 2*width logprobs, all
  beams at once; vLLM's prefix cache means a step reads only the new tokens, not the prompt;
- the 2*width best (beam, token) pairs by cumulative logprob become children; a child that
  ends (EOS, a stop token, a stop string, max_tokens, the context) is a finished hypothesis;
- the width best finished hypotheses are kept; the width best running children go on;
- score = cumulative_logprob / (length ** length_penalty), length = prompt + output tokens,
  a trailing EOS not counted;
- after each step: stop when no beam runs; else go on while fewer than `width` finished;
  else `early_stopping` decides: True stops, False stops once the width-th finished score
  beats the best running beam's score now, "never" compares against the best score the
  running beam could still reach (at the longest length, when length_penalty > 0).

Beams are scored on the model's raw log-probabilities; penalties and logit_bias do not apply.
Deterministic: ties break on (beam, token id) order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fleet.wire import protocol


class Model(Protocol):
    """What beam search needs of the engine service (engine/service.py's EngineService)."""

    engine: Any  # vLLM's AsyncLLM
    tokenizer: Any
    max_model_len: int
    info: protocol.EngineInfo

    def token_text(self, token_id: int, logprob: Any) -> str: ...

    def prompt_frame(self, ids: list[int], prompt_logprobs: Any, echo: bool) -> protocol.Prompt: ...

    def failure(self, error: Exception, request_id: str, param: str | None = None) -> protocol.Error: ...

    def lora(self, req: protocol.GenerateRequest) -> Any: ...


@dataclass
class Beam:
    """One hypothesis: output tokens so far, their logprobs, and how it ended (if it did)."""

    tokens: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[protocol.TokenLogprob] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    ends_with_eos: bool = False

    def score(self, prompt_len: int, length_penalty: float, seq_len: int | None = None) -> float:
        """cumulative_logprob / length ** length_penalty (HF's rule: a trailing EOS is not counted)."""
        if seq_len is None:
            seq_len = prompt_len + len(self.tokens) - (1 if self.ends_with_eos else 0)
        scale: float = max(seq_len, 1) ** length_penalty  # a positive base: never complex
        return self.cumulative_logprob / scale


def should_stop(
    early_stopping: bool | str,
    length_penalty: float,
    best_running: Beam,
    worst_kept_finished: Beam,
    prompt_len: int,
    max_len: int,
) -> bool:
    """vLLM 0.2.7's _check_beam_search_early_stopping, given width finished hypotheses exist."""
    if early_stopping is True:
        return True
    worst = worst_kept_finished.score(prompt_len, length_penalty)
    if early_stopping == "never" and length_penalty > 0.0:
        best = best_running.score(prompt_len, length_penalty, seq_len=max_len)
    else:
        best = best_running.score(prompt_len, length_penalty)
    return worst >= best


class BeamSearchRun:
    """One beam-search request on one engine."""

    def __init__(self, service: Model, req: protocol.GenerateRequest, prompt: list[int]) -> None:
        assert req.beam is not None
        self.service = service
        self.req = req
        self.prompt = prompt
        self.width = req.beam.width
        self.length_penalty = req.beam.length_penalty
        self.early_stopping = req.beam.early_stopping
        s = req.sampling
        room = service.max_model_len - len(prompt)
        self.max_tokens = min(s.max_tokens, room)
        # 0.2.7: the longest reachable length for "never" is max(prompt + max_tokens, max_model_len).
        self.max_len = max(len(prompt) + s.max_tokens, service.max_model_len)
        eos = service.info.eos_token_id
        self.eos = None if s.ignore_eos else eos
        self.stop_ids = set(s.stop_token_ids)
        self.stops = s.stop
        self.top_logprobs = s.logprobs
        self.steps = 0

    def step_params(self, prompt_logprobs: int | None = None) -> Any:
        """One greedy token with the 2*width best alternatives."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1,
            max_tokens=1,
            temperature=0.0,
            logprobs=2 * self.width,
            prompt_logprobs=prompt_logprobs,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            skip_clone=True,  # one step of one beam: made for that request alone
        )

    async def expand(self, beam_index: int, beam: Beam, prompt_logprobs: int | None) -> tuple[int, Any]:
        """Ask vLLM for the next-token logprobs of one beam; returns (beam index, RequestOutput)."""
        rid = f"{self.req.request_id}-b{self.steps}-{beam_index}"
        params = self.step_params(prompt_logprobs)
        final = None
        async for out in self.service.engine.generate({"prompt_token_ids": self.prompt + beam.tokens}, params, rid,
                                                      lora_request=self.service.lora(self.req)):
            final = out
        assert final is not None
        return beam_index, final

    def child(self, parent: Beam, token: int, logprob: float, entries: dict[int, Any]) -> Beam:
        """Extend `parent` by one token and decide whether the child is finished."""
        beam = Beam(
            tokens=[*parent.tokens, token],
            cumulative_logprob=parent.cumulative_logprob + logprob,
            logprobs=parent.logprobs + ([self.position(token, entries)] if self.top_logprobs is not None else []),
        )
        beam.text = self.service.tokenizer.decode(beam.tokens, skip_special_tokens=True)
        if self.eos is not None and token == self.eos:
            beam.finish_reason, beam.ends_with_eos = "stop", True
        elif token in self.stop_ids:
            beam.finish_reason = "stop"
        elif hit := [i for i in (beam.text.find(s) for s in self.stops) if i >= 0]:
            beam.finish_reason, beam.text = "stop", beam.text[: min(hit)]
        elif len(beam.tokens) >= self.max_tokens:
            beam.finish_reason = "length"
        return beam

    def position(self, token: int, entries: dict[int, Any]) -> protocol.TokenLogprob:
        """The chosen token's logprob with the user's top-k alternatives (the chosen one included)."""
        k = self.top_logprobs or 0
        ranked = sorted(entries.items(), key=lambda kv: (-kv[1].logprob, kv[0]))
        top = ranked[:k]
        if token not in {t for t, _ in top}:
            top.append((token, entries[token]))
        text = self.service.token_text
        return protocol.TokenLogprob(text(token, entries[token]), entries[token].logprob, [(text(t, lp), lp.logprob) for t, lp in top])

    async def run(self) -> tuple[list[Beam], protocol.Prompt]:
        """Search; return the finished hypotheses best first, and the Prompt frame."""
        running = [Beam()]
        finished: list[Beam] = []
        prompt_frame = protocol.Prompt(token_ids=self.prompt)
        plen = len(self.prompt)
        key = lambda b: b.score(plen, self.length_penalty)  # noqa: E731
        while running:
            want_prompt_logprobs = self.req.sampling.prompt_logprobs if self.steps == 0 else None
            outs = await asyncio.gather(*(self.expand(i, b, want_prompt_logprobs) for i, b in enumerate(running)))
            if self.steps == 0:
                prompt_frame = self.service.prompt_frame(self.prompt, outs[0][1].prompt_logprobs, self.req.echo)
            self.steps += 1
            scored: list[tuple[float, int, int, Any]] = []
            for i, out in outs:
                entries = out.outputs[0].logprobs[0]
                for token, lp in entries.items():
                    scored.append((running[i].cumulative_logprob + lp.logprob, i, token, entries))
            scored.sort(key=lambda c: (-c[0], c[1], c[2]))
            children = [self.child(running[i], t, e[t].logprob, e) for _, i, t, e in scored[: 2 * self.width]]
            finished = sorted(finished + [c for c in children if c.finish_reason], key=key, reverse=True)[: self.width]
            alive = sorted((c for c in children if not c.finish_reason), key=key, reverse=True)
            if not alive:
                break
            if len(finished) >= self.width and should_stop(
                self.early_stopping, self.length_penalty, alive[0], finished[self.width - 1], plen, self.max_len
            ):
                break
            running = alive[: self.width]
        return finished, prompt_frame


async def beam_search_frames(service: Model, req: protocol.GenerateRequest, prompt: list[int]) -> AsyncIterator[bytes]:
    """The /generate body for a beam-search request: Prompt, one Delta per finished beam (best first), Done."""
    search = BeamSearchRun(service, req, prompt)
    try:
        finished, prompt_frame = await search.run()
    except Exception as e:  # vLLM's refusal a 400, anything else a 500 (service.failure)
        yield protocol.encode_frame(service.failure(e, req.request_id))
        return
    chunk = bytearray(protocol.encode_frame(prompt_frame))
    for i, beam in enumerate(finished):
        chunk += protocol.encode_frame(
            protocol.Delta(
                index=i,
                text=beam.text,
                token_ids=beam.tokens,
                logprobs=beam.logprobs if search.top_logprobs is not None else None,
                finish_reason=beam.finish_reason,  # type: ignore[arg-type]
                cumulative_logprob=beam.cumulative_logprob,
            )
        )
    chunk += protocol.encode_frame(
        protocol.Done(prompt_tokens=len(prompt), completion_tokens=sum(len(b.tokens) for b in finished))
    )
    yield bytes(chunk)
