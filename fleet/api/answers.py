"""Engine output -> answers, for both generation endpoints: run a plan on an engine, collect it
or stream it.

One engine request per prompt, all in flight at once. Both paths fold the engine's frames the same
way (`PromptResult.fold`); the shape of what the client gets (text_completion or chat.completion
objects) belongs to each endpoint (completions/serving.py, chat/serving.py), which also shapes
stream events through a `Shaper`. Streaming answers wait for each prompt's first frame before
sending headers, so errors the engine finds up front (a prompt longer than the context, say) are
still plain HTTP 400s rather than events in a 200 stream.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from fleet.api.planning import Plan
from fleet.api.protocol import ErrorResponse, FinishReason, PromptTokensDetails, Usage
from fleet.errors import EngineFailure, FleetError, InvalidRequest
from fleet.wire import protocol
from fleet.wire.asgi import LastChunk

log = logging.getLogger("fleet.gateway")
_json = msgspec.json.Encoder()
DONE_EVENT = b"data: [DONE]\n\n"
Batches = AsyncGenerator[list[protocol.Frame], None]  # a generator: open_stream acloses the unread ones


class FrameSource(Protocol):
    """What answering needs of a model's engine: its frames, and where to count tokens."""

    def generate(self, req: protocol.GenerateRequest) -> Batches:
        """The frames of one engine request, in batches as they arrive."""
        ...

    def call(self, path: str, req: msgspec.Struct) -> Batches:
        """The frames of one request to another of the engine's frame routes (/embed, /tokenize, /detokenize)."""
        ...

    def count_tokens(self, completion: int, prompt: int) -> None:
        """Tokens of one finished engine request."""


def sse(payload: bytes) -> bytes:
    """One server-sent event. msgspec's JSON never contains a raw newline, so one data line is exact."""
    return b"data: " + payload + b"\n\n"


def error_event(error: FleetError) -> bytes:
    """The event that reports an error after streaming began (the SDK raises APIError on it)."""
    return sse(_json.encode(ErrorResponse.of(error)))


def frame_error(frame: protocol.Error) -> FleetError:
    """The gateway's exception for an engine Error frame."""
    if frame.status == 400:
        return InvalidRequest(frame.message, param=frame.param)
    return EngineFailure(frame.message)


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: 128 random bits (uuid4's object costs more than the bits)."""
    return f"{prefix}-{secrets.token_hex(16)}"


def created() -> int:
    """The `created` timestamp of an answer."""
    return int(time.time())


def engine_requests(plan: Plan, request_id: str) -> list[protocol.GenerateRequest]:
    """One engine request per prompt."""
    return [
        protocol.GenerateRequest(
            request_id=f"{request_id}-{p}", prompt=prompt, sampling=plan.sampling, beam=plan.beam, echo=plan.echo,
            final_only=not plan.stream, tools=plan.tools, reasoning=plan.reasoning,
        )
        for p, prompt in enumerate(plan.prompts)
    ]


def finish_reason(reason: str | None) -> FinishReason | None:
    """OpenAI knows stop and length; an aborted sequence reports stop."""
    return None if reason is None else ("length" if reason == "length" else "stop")


@dataclass
class Call:
    """One tool call of a candidate, accumulated from its pieces."""

    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Candidate:
    """One output sequence of one prompt, accumulated from Delta frames."""

    text: str = ""
    tokens: int = 0
    logprobs: list[protocol.TokenLogprob] | None = None
    finish_reason: str | None = None
    cumulative_logprob: float = 0.0
    reasoning: str = ""
    calls: dict[int, Call] = field(default_factory=dict)

    def add(self, delta: protocol.Delta) -> None:
        """Fold one Delta frame in."""
        self.text += delta.text
        self.tokens += len(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.cumulative_logprob is not None:
            self.cumulative_logprob = delta.cumulative_logprob
        self.reasoning += delta.reasoning
        for piece in delta.tool_calls or ():
            call = self.calls.get(piece.index)
            if call is None:
                call = self.calls[piece.index] = Call()
            call.id = piece.id or call.id
            call.name = piece.name or call.name
            call.arguments += piece.arguments


def best(candidates: list[Candidate], n: int) -> list[Candidate]:
    """The n candidates with the highest cumulative logprob (vLLM 0.2.7's best_of), best first."""
    if len(candidates) <= n:
        return candidates
    return sorted(candidates, key=lambda c: c.cumulative_logprob, reverse=True)[:n]


@dataclass
class PromptResult:
    """What one prompt's engine request produced so far."""

    prompt: protocol.Prompt | None = None
    candidates: dict[int, Candidate] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def fold(self, frame: protocol.Frame, source: FrameSource) -> protocol.Delta | None:
        """Take one frame in: a Delta is returned for the caller (collected or streamed), the
        Prompt and the token counts are kept, an Error is raised as the gateway's error."""
        match frame:
            case protocol.Delta():
                return frame
            case protocol.Prompt():
                self.prompt = frame
            case protocol.Done(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens):
                self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
                self.cached_tokens, self.reasoning_tokens = frame.cached_tokens, frame.reasoning_tokens
                source.count_tokens(completion_tokens, prompt_tokens)
            case protocol.Error():
                raise frame_error(frame)
        return None

    def usage_so_far(self, completion_tokens: int) -> Usage:
        """One choice's usage while it streams (the prompt is known from the first frame on)."""
        prompt_tokens = len(self.prompt.token_ids) if self.prompt else 0
        return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)

    def add(self, delta: protocol.Delta) -> None:
        """Collect a Delta into its candidate."""
        cand = self.candidates.get(delta.index)
        if cand is None:
            cand = self.candidates[delta.index] = Candidate()
        cand.add(delta)

    def chosen(self, plan: Plan) -> list[Candidate]:
        """The n choices to return: the first n beams (best first), or best_of's top n."""
        ranked = [self.candidates[i] for i in sorted(self.candidates)]
        return ranked[: plan.n] if plan.beam else best(ranked, plan.n)


# --- whole answers ----------------------------------------------------------------------------


async def run_prompt(source: FrameSource, req: protocol.GenerateRequest) -> PromptResult:
    """Collect one engine request to its end."""
    result = PromptResult()
    async for batch in source.generate(req):
        for frame in batch:
            if (delta := result.fold(frame, source)) is not None:
                result.add(delta)
    return result


async def collect(source: FrameSource, plan: Plan, request_id: str) -> list[PromptResult]:
    """Run every prompt of the plan to its end, concurrently."""
    reqs = engine_requests(plan, request_id)
    if len(reqs) == 1:
        return [await run_prompt(source, reqs[0])]
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run_prompt(source, r)) for r in reqs]
    return [t.result() for t in tasks]


def usage(results: list[PromptResult], plan: Plan) -> Usage:
    """Token counts; beam search counts the beams returned, as vLLM 0.2.7 did."""
    if plan.beam:
        completion_tokens = sum(c.tokens for r in results for c in r.chosen(plan))
    else:
        completion_tokens = sum(r.completion_tokens for r in results)
    return total_usage(results, completion_tokens)


def total_usage(results: list[PromptResult], completion_tokens: int) -> Usage:
    """A whole answer's usage, with the prompt tokens vLLM's prefix cache held."""
    prompt_tokens = sum(r.prompt_tokens for r in results)
    cached = PromptTokensDetails(sum(r.cached_tokens for r in results))
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, cached)


# --- streams ----------------------------------------------------------------------------------


class Shaper(Protocol):
    """Turns engine deltas into one API's stream events (SSE bytes, one or more events)."""

    def delta(
        self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int, usage: Usage | None
    ) -> bytes:
        """The event(s) for one Delta of choice `index`; `usage` (continuous usage) goes in each of them."""

    async def end(self, results: list[PromptResult], failed: FleetError | None) -> bytes:
        """The stream's last events: how it ended (its usage, or the error that ended it)."""


def chunks_end(usage_event: Callable[[Usage], bytes], plan: Plan, results: list[PromptResult],
               failed: FleetError | None) -> bytes:
    """How a stream of chat.completion.chunk or text_completion objects ends: an error event, or the
    usage chunk (stream_options.include_usage); then `data: [DONE]`."""
    if failed is not None:
        tail = error_event(failed)
    elif plan.include_usage:
        tail = usage_event(total_usage(results, sum(r.completion_tokens for r in results)))
    else:
        tail = b""
    return tail + DONE_EVENT


async def _first(gen: Batches) -> list[protocol.Frame]:
    batch = await anext(gen)
    if isinstance(batch[0], protocol.Error):
        raise frame_error(batch[0])
    return batch


async def open_stream(source: FrameSource, plan: Plan, shaper: Shaper, request_id: str) -> AsyncGenerator[bytes, None]:
    """Start a streamed answer; raises before any byte is sent if the engine refuses the request."""
    gens = [source.generate(r) for r in engine_requests(plan, request_id)]
    try:
        firsts = await asyncio.gather(*(_first(g) for g in gens))
    except BaseException:
        await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
        raise
    return _stream_body(_merge([_prefixed(f, g) for f, g in zip(firsts, gens, strict=True)]), plan, shaper, source)


async def _prefixed(first: list[protocol.Frame], gen: Batches) -> Batches:
    yield first
    async for batch in gen:
        yield batch


async def _merge(gens: list[Batches]) -> AsyncIterator[tuple[int, list[protocol.Frame]]]:
    """Frame batches of several engine streams as they arrive, tagged with the prompt index."""
    if len(gens) == 1:
        async for batch in gens[0]:
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[protocol.Frame] | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, gen: Batches) -> None:
        try:
            async for batch in gen:
                await queue.put((p, batch))
        except Exception as e:  # handed to the consumer
            await queue.put((p, e))
        await queue.put((p, None))

    tasks = [asyncio.create_task(pump(p, g)) for p, g in enumerate(gens)]
    try:
        running = len(tasks)
        while running:
            p, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield p, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _stream_body(
    batches: AsyncIterator[tuple[int, list[protocol.Frame]]], plan: Plan, shaper: Shaper, source: FrameSource
) -> AsyncGenerator[bytes, None]:
    """The SSE body: one write per batch of frames (all its events), an error event on failure."""
    results = [PromptResult() for _ in plan.prompts]
    sent = [0] * (len(plan.prompts) * plan.n) if plan.continuous_usage else None  # tokens per choice so far
    failed: FleetError | None = None
    try:
        async for p, batch in batches:
            result, events = results[p], []
            try:
                for frame in batch:
                    if (delta := result.fold(frame, source)) is not None:
                        index, usage_so_far = p * plan.n + delta.index, None
                        if sent is not None:
                            sent[index] += len(delta.token_ids)
                            usage_so_far = result.usage_so_far(sent[index])
                        events.append(shaper.delta(index, delta, result.prompt, p, usage_so_far))
            except FleetError as e:
                failed = e
            if events:
                yield b"".join(events)
            if failed is not None:
                break
    except FleetError as e:
        failed = e
    except Exception as e:  # a fault of fleet's own, after the answer began: the stream still ends in an error event
        log.exception("unexpected error in a stream")
        failed = FleetError(f"internal error: {type(e).__name__}")
    try:
        last = await shaper.end(results, failed)
    except Exception as e:
        if failed is not None:  # the error event itself could not be made
            raise
        log.exception("unexpected error ending a stream")
        last = await shaper.end(results, FleetError(f"internal error: {type(e).__name__}"))
    yield LastChunk(last)
