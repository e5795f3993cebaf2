"""A request whose replica died under it, taken over by another: what the caller has of its answer
(`Progress`), what is sent next (`after_death`: the same request again, a continuation, or nothing),
and a continuation's frames made to read as one answer (`Progress.carry`).

- Nothing sent yet (every whole answer; a stream before its first token): the same request runs
  again on another replica, the same seed included, so the answer is the one it would have been.
- A stream with tokens sent: a continuation, the prompt's token ids followed by the tokens sent,
  with what is left of max_tokens and min_tokens; the engine sends the text it had held back and
  matches stop strings across the seam (fleet/engine/resume.py). With greedy sampling the text is
  token for token the undisturbed one. Where a continuation cannot be exact (`why_not_continued`),
  the stream ends with an error event naming why, never silently different.
- Bounded: each replica at most once per request (routing's `tried`), no waiting for a replica to
  come back, and a request under which MAX_DEATHS engines died is not sent to another.

May import: fleet.wire, fleet.errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from fleet.errors import RequestGivenUp
from fleet.wire import protocol

MAX_DEATHS = 2  # engines that may die under one request: the second one's death fails it (a poison prompt)


@dataclass
class Progress:
    """What the caller has of one engine request's answer so far: its Prompt frame, and of choice 0
    its token ids, characters of text and finish reason; Delta frames of any choice."""

    prompt: protocol.Prompt | None = None
    token_ids: list[int] = field(default_factory=list)
    text: int = 0
    deltas: int = 0
    finish: str | None = None
    base: int = 0  # tokens sent when the running continuation began (its Done counts the rest)
    continuing: bool = False

    def saw(self, batch: list[protocol.Frame]) -> None:
        """Note a batch the caller gets (the hot path: one type test per frame)."""
        for f in batch:
            if type(f) is protocol.Delta:
                self.deltas += 1
                if f.index == 0:
                    self.token_ids += f.token_ids
                    self.text += len(f.text)
                    if f.finish_reason is not None:
                        self.finish = f.finish_reason
            elif type(f) is protocol.Prompt and self.prompt is None:
                self.prompt = f

    def carry(self, batch: list[protocol.Frame]) -> list[protocol.Frame]:
        """A later attempt's batch as the caller gets it: no second Prompt frame, and a
        continuation's Done counting the whole answer (its own prompt ends with tokens sent before)."""
        out: list[protocol.Frame] = []
        for f in batch:
            if type(f) is protocol.Prompt and self.prompt is not None:
                continue
            if type(f) is protocol.Done and self.continuing and self.prompt is not None:
                prompt = len(self.prompt.token_ids)
                f = msgspec.structs.replace(
                    f,
                    prompt_tokens=prompt,
                    completion_tokens=self.base + f.completion_tokens,
                    cached_tokens=min(f.cached_tokens, prompt),
                )
            out.append(f)
        return out

    def done(self) -> protocol.Done | None:
        """The Done a finished answer lacks when its engine died between its last token and Done."""
        if self.finish is None or self.prompt is None:
            return None
        return protocol.Done(prompt_tokens=len(self.prompt.token_ids), completion_tokens=len(self.token_ids))


def why_not_continued(req: protocol.GenerateRequest) -> str | None:
    """Why a stream cut off after some tokens cannot go on exactly on another engine, or None."""
    s = req.sampling
    if req.beam is not None:
        return "beam search"
    if s.n > 1:
        return "several choices (n or best_of)"
    if req.tools is not None:
        return "tool calls (read from the answer as it is generated)"
    if req.reasoning:
        return "reasoning read apart (read from the answer as it is generated)"
    if s.structured is not None:
        return "structured outputs (the grammar's state is the dead engine's)"
    if s.presence_penalty or s.frequency_penalty:
        return "presence_penalty or frequency_penalty (they count the tokens generated so far)"
    if s.bad_words:
        return "bad_words (matched against the tokens generated so far)"
    if s.seed is not None and s.temperature > 0:
        return "a seed and temperature > 0 (the undisturbed answer's random draws cannot be replayed)"
    return None


def continuation(req: protocol.GenerateRequest, progress: Progress, attempt: int) -> protocol.GenerateRequest:
    """`req` carried on after the tokens `progress` has: the prompt's ids and those tokens as the
    prompt, what is left of max_tokens and min_tokens, no echo or prompt logprobs (sent already)."""
    assert progress.prompt is not None
    sent = len(progress.token_ids)
    s = req.sampling
    sampling = msgspec.structs.replace(
        s, max_tokens=s.max_tokens - sent, min_tokens=max(0, s.min_tokens - sent), prompt_logprobs=None
    )
    return msgspec.structs.replace(
        req,
        request_id=f"{req.request_id}-r{attempt}",
        prompt=progress.prompt.token_ids + progress.token_ids,
        sampling=sampling,
        echo=False,
        resume=protocol.Resume(generated=sent, text_sent=progress.text),
    )


def after_death(req: msgspec.Struct, progress: Progress, died_on: list[str]) -> msgspec.Struct | protocol.Done:
    """What to send to the next replica after the engines `died_on` died under `req` (the last one
    now): `req` again, or its continuation; or the Done of an answer that had finished, the engine
    dying before its Done. RequestGivenUp when it must not go on."""
    one_choice = isinstance(req, protocol.GenerateRequest) and req.sampling.n == 1 and req.beam is None
    if one_choice and (done := progress.done()) is not None:
        return done
    if len(died_on) >= MAX_DEATHS:
        raise RequestGivenUp(
            f"the engines of {', '.join(died_on)} died while answering this request; fleet does not send it to "
            f"another replica (a request that kills {MAX_DEATHS} engines may be what kills them)"
        )
    if progress.deltas == 0 or not isinstance(req, protocol.GenerateRequest):
        return req
    why = why_not_continued(req)
    if why is not None:
        raise RequestGivenUp(
            f"the engine of {died_on[-1]} died after sending {len(progress.token_ids)} tokens of this stream, and a "
            f"stream with {why} cannot be continued exactly on another replica"
        )
    progress.base, progress.continuing = len(progress.token_ids), True
    return continuation(req, progress, len(died_on))
