"""The requests the gateway answered last, for the status page: when, which model and replica,
which route, the status, tokens, time to first token and duration (the prompt's start only when
`[ui] show_prompts` says so).

`Tracked` (tracking.py) opens one `Trace` per request and sets it as the request task's `TRACE`;
the routed engine request (routing/replicas.py) notes the replica and the tokens there; `Recent` keeps the last ones.
A request costs one small object and a deque append.
"""

from __future__ import annotations

import collections
import contextvars

import msgspec

KEPT = 200
PROMPT_SHOWN = 160  # characters of a prompt, when shown


class Trace(msgspec.Struct):
    """One request as the status page lists it (times in ms; `at` in Unix seconds)."""

    seq: int = 0
    at: float = 0.0
    model: str = ""
    route: str = ""
    replica: str = ""
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    duration_ms: float = 0.0
    prompt: str | None = None

    def served_by(self, replica: str) -> None:
        """An engine request went to `replica` (several: "a, b")."""
        if not self.replica:
            self.replica = replica
        elif replica not in self.replica.split(", "):
            self.replica += ", " + replica


TRACE: contextvars.ContextVar[Trace | None] = contextvars.ContextVar("fleet_trace", default=None)


class Recent:
    """The last `kept` requests, numbered in the order they ended."""

    def __init__(self, kept: int = KEPT) -> None:
        self.seq = 0
        self._kept: collections.deque[Trace] = collections.deque(maxlen=kept)

    def add(self, trace: Trace) -> None:
        self.seq += 1
        trace.seq = self.seq
        self._kept.append(trace)

    def after(self, seq: int) -> list[Trace]:
        """The kept requests numbered above `seq`, oldest first."""
        out = []
        for trace in reversed(self._kept):
            if trace.seq <= seq:
                break
            out.append(trace)
        out.reverse()
        return out


def prompt_preview(prompt: object) -> str:
    """The start of a request's prompt for the page: a completion's text (the first of a list, or
    token ids), or a chat's last user message."""
    text = prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        text = first if isinstance(first, str) else f"{len(prompt)} token ids" if isinstance(first, int) else first
    if isinstance(text, list) and text and isinstance(text[0], int):
        text = f"{len(text)} token ids"
    if not isinstance(text, str):
        text = repr(text)
    return text[:PROMPT_SHOWN]
