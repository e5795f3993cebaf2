"""The work behind both generation routes: run a plan on an engine, collect it or stream it.

One engine request per prompt, all in flight at once. The shape of what the client gets
(text_completion or chat.completion objects) belongs to a `Shaper` (completions.py, chat.py);
this module only knows frames. Streaming responses wait for each prompt's first frame before
sending headers, so errors the engine finds up front (a prompt longer than the context, say)
are still plain HTTP 400s rather than events in a 200 stream.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from fleet import protocol
from fleet.errors import EngineFailure, FleetError, InvalidRequest
from fleet.routing import Backend
from fleet.schemas import Usage
from fleet.translate import Candidate, Plan, best

_json = msgspec.json.Encoder()
DONE_EVENT = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    """One server-sent event. msgspec's JSON never contains a raw newline, so one data line is exact."""
    return b"data: " + payload + b"\n\n"


def error_event(error: FleetError) -> bytes:
    """The event that reports an error after streaming began (the SDK raises APIError on it)."""
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return sse(_json.encode(body))


def frame_error(frame: protocol.Error) -> FleetError:
    """The gateway's exception for an engine Error frame."""
    if frame.status == 400:
        return InvalidRequest(frame.message, param=frame.param)
    return EngineFailure(frame.message)


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: 128 random bits (uuid4's object costs more than the bits)."""
    return f"{prefix}-{secrets.token_hex(16)}"


def engine_requests(plan: Plan, request_id: str) -> list[protocol.GenerateRequest]:
    """One engine request per prompt."""
    return [
        protocol.GenerateRequest(
            request_id=f"{request_id}-{p}", prompt=prompt, sampling=plan.sampling, beam=plan.beam, echo=plan.echo,
            final_only=not plan.stream,
        )
        for p, prompt in enumerate(plan.prompts)
    ]


# --- whole responses --------------------------------------------------------------------------


@dataclass
class PromptResult:
    """Everything one prompt's engine request produced."""

    prompt: protocol.Prompt | None = None
    candidates: dict[int, Candidate] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def chosen(self, plan: Plan) -> list[Candidate]:
        """The n choices to return: the first n beams (best first), or best_of's top n."""
        ranked = [self.candidates[i] for i in sorted(self.candidates)]
        return ranked[: plan.n] if plan.beam else best(ranked, plan.n)


async def run_prompt(backend: Backend, req: protocol.GenerateRequest) -> PromptResult:
    """Collect one engine request to its end."""
    result = PromptResult()
    async for batch in backend.client.generate(req):
        for frame in batch:
            if isinstance(frame, protocol.Delta):
                cand = result.candidates.get(frame.index)
                if cand is None:
                    cand = result.candidates[frame.index] = Candidate()
                cand.add(frame)
            elif isinstance(frame, protocol.Prompt):
                result.prompt = frame
            elif isinstance(frame, protocol.Done):
                result.prompt_tokens, result.completion_tokens = frame.prompt_tokens, frame.completion_tokens
                backend.stats.add_tokens(frame.completion_tokens, frame.prompt_tokens)
            else:
                raise frame_error(frame)
    return result


async def collect(backend: Backend, plan: Plan, request_id: str) -> list[PromptResult]:
    """Run every prompt of the plan to its end, concurrently."""
    reqs = engine_requests(plan, request_id)
    if len(reqs) == 1:
        return [await run_prompt(backend, reqs[0])]
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(run_prompt(backend, r)) for r in reqs]
    return [t.result() for t in tasks]


def usage(results: list[PromptResult], plan: Plan) -> Usage:
    """Token counts; beam search counts the beams returned, as vLLM 0.2.7 did."""
    prompt_tokens = sum(r.prompt_tokens for r in results)
    if plan.beam:
        completion_tokens = sum(c.tokens for r in results for c in r.chosen(plan))
    else:
        completion_tokens = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


# --- streams ----------------------------------------------------------------------------------


class Shaper(Protocol):
    """Turns engine deltas into one API's stream events (SSE bytes, one or more events)."""

    def delta(self, index: int, frame: protocol.Delta, prompt: protocol.Prompt | None, prompt_index: int) -> bytes:
        """The event(s) for one Delta of choice `index`."""

    def usage(self, usage: Usage) -> bytes:
        """The final usage event (stream_options.include_usage)."""


Batches = AsyncIterator[list[protocol.Frame]]


async def _first(gen: Batches) -> list[protocol.Frame]:
    batch = await anext(gen)
    if isinstance(batch[0], protocol.Error):
        raise frame_error(batch[0])
    return batch


async def open_stream(backend: Backend, plan: Plan, shaper: Shaper, request_id: str) -> AsyncGenerator[bytes, None]:
    """Start a streamed response; raises before any byte is sent if an engine refuses the request."""
    gens = [backend.client.generate(r) for r in engine_requests(plan, request_id)]
    try:
        firsts = await asyncio.gather(*(_first(g) for g in gens))
    except BaseException:
        await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
        raise
    return _stream_body(_merge([_prefixed(f, g) for f, g in zip(firsts, gens)]), plan, shaper, backend)


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
        except Exception as e:  # noqa: BLE001 - handed to the consumer
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
    batches: AsyncIterator[tuple[int, list[protocol.Frame]]], plan: Plan, shaper: Shaper, backend: Backend
) -> AsyncGenerator[bytes, None]:
    """The SSE body: one write per batch of frames (all its events), an error event on failure."""
    prompts: dict[int, protocol.Prompt] = {}
    prompt_tokens = completion_tokens = 0
    failed: FleetError | None = None
    try:
        async for p, batch in batches:
            events: list[bytes] = []
            for frame in batch:
                if isinstance(frame, protocol.Delta):
                    events.append(shaper.delta(p * plan.n + frame.index, frame, prompts.get(p), p))
                elif isinstance(frame, protocol.Prompt):
                    prompts[p] = frame
                elif isinstance(frame, protocol.Done):
                    prompt_tokens += frame.prompt_tokens
                    completion_tokens += frame.completion_tokens
                    backend.stats.add_tokens(frame.completion_tokens, frame.prompt_tokens)
                else:
                    failed = frame_error(frame)
                    break
            if events:
                yield b"".join(events)
            if failed is not None:
                break
    except FleetError as e:
        failed = e
    if failed is not None:
        tail = error_event(failed)
    elif plan.include_usage:
        tail = shaper.usage(Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens))
    else:
        tail = b""
    yield tail + DONE_EVENT


def created() -> int:
    """The `created` timestamp of a response."""
    return int(time.time())
