"""The work behind /v1/completions: run a plan on an engine, shape the answer or the SSE stream.

One engine request per prompt, all in flight at once. Streaming responses wait for each
prompt's first frame before sending headers, so errors the engine finds up front (a prompt
longer than the context, say) are still plain HTTP 400s rather than events in a 200 stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec

from fleet import protocol
from fleet.errors import EngineFailure, FleetError, InvalidRequest
from fleet.routing import Backend
from fleet.schemas import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage
from fleet.translate import Candidate, CompletionPlan, best, completion_choice, completion_logprobs, finish_reason

_json = msgspec.json.Encoder()
DONE_EVENT = b"data: [DONE]\n\n"


def sse(payload: bytes) -> bytes:
    """One server-sent event. msgspec's JSON never contains a raw newline, so one data line is exact."""
    return b"data: " + payload + b"\n\n"


def error_event(error: FleetError) -> bytes:
    """The event that reports an error after streaming began (the SDK raises APIError on it)."""
    body = {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}
    return sse(_json.encode(body))


def raise_for_frame(frame: protocol.Error) -> None:
    """Turn an engine Error frame into the gateway's exception."""
    if frame.status == 400:
        raise InvalidRequest(frame.message, param=frame.param)
    raise EngineFailure(frame.message)


def engine_requests(plan: CompletionPlan, request_id: str) -> list[protocol.GenerateRequest]:
    """One engine request per prompt."""
    return [
        protocol.GenerateRequest(
            request_id=f"{request_id}-{p}", prompt=prompt, sampling=plan.sampling, beam=plan.beam, echo=plan.echo
        )
        for p, prompt in enumerate(plan.prompts)
    ]


@dataclass
class PromptResult:
    """Everything one prompt's engine request produced."""

    prompt: protocol.Prompt | None = None
    candidates: dict[int, Candidate] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def run_prompt(backend: Backend, req: protocol.GenerateRequest) -> PromptResult:
    """Collect one engine request to its end."""
    result = PromptResult()
    async for frame in backend.client.generate(req):
        if isinstance(frame, protocol.Delta):
            cand = result.candidates.get(frame.index)
            if cand is None:
                cand = result.candidates[frame.index] = Candidate()
            cand.add(frame)
        elif isinstance(frame, protocol.Prompt):
            result.prompt = frame
        elif isinstance(frame, protocol.Done):
            result.prompt_tokens, result.completion_tokens = frame.prompt_tokens, frame.completion_tokens
        else:
            raise_for_frame(frame)
    return result


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def _chosen_beams(results: list[PromptResult], n: int) -> list[Candidate]:
    return [r.candidates[i] for r in results for i in sorted(r.candidates)[:n]]


async def complete(backend: Backend, plan: CompletionPlan, model: str) -> bytes:
    """A whole, non-streamed text_completion as JSON bytes."""
    request_id = new_id("cmpl")
    reqs = engine_requests(plan, request_id)
    if len(reqs) == 1:
        results = [await run_prompt(backend, reqs[0])]
    else:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(run_prompt(backend, r)) for r in reqs]
        results = [t.result() for t in tasks]
    choices: list[CompletionChoice] = []
    for p, (prompt, result) in enumerate(zip(plan.prompts, results)):
        ranked = [result.candidates[i] for i in sorted(result.candidates)]
        chosen = ranked[: plan.n] if plan.beam else best(ranked, plan.n)
        prompt_text = prompt if isinstance(prompt, str) else (result.prompt.text if result.prompt else "") or ""
        prompt_logprobs = result.prompt.logprobs if result.prompt else None
        for i, cand in enumerate(chosen):
            choices.append(completion_choice(p * plan.n + i, cand, plan, prompt_text, prompt_logprobs))
    prompt_tokens = sum(r.prompt_tokens for r in results)
    if plan.beam:  # usage counts the beams returned, as vLLM 0.2.7 did
        completion_tokens = sum(c.tokens for c in _chosen_beams(results, plan.n))
    else:
        completion_tokens = sum(r.completion_tokens for r in results)
    response = CompletionResponse(
        id=request_id,
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
    )
    return _json.encode(response)


class _Chunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


@dataclass
class _StreamChoice:
    """Per-choice streaming state: whether the echo was sent, and the running text offset."""

    started: bool = False
    offset: int = 0


async def _first(gen: AsyncIterator[protocol.Frame]) -> protocol.Frame:
    frame = await anext(gen)
    if isinstance(frame, protocol.Error):
        raise_for_frame(frame)
    return frame


async def open_stream(backend: Backend, plan: CompletionPlan, model: str) -> AsyncIterator[bytes]:
    """Start a streamed completion; raises before any byte is sent if an engine refuses it."""
    request_id = new_id("cmpl")
    gens = [backend.client.generate(r) for r in engine_requests(plan, request_id)]
    try:
        firsts = await asyncio.gather(*(_first(g) for g in gens))
    except BaseException:
        await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
        raise
    return _stream_body(gens, firsts, plan, model, request_id)


async def _merge(gens: list[AsyncIterator[protocol.Frame]]) -> AsyncIterator[tuple[int, protocol.Frame]]:
    """Frames of several engine streams as they arrive, tagged with the prompt index."""
    if len(gens) == 1:
        async for frame in gens[0]:
            yield 0, frame
        return
    queue: asyncio.Queue[tuple[int, protocol.Frame | BaseException | None]] = asyncio.Queue()

    async def pump(p: int, gen: AsyncIterator[protocol.Frame]) -> None:
        try:
            async for frame in gen:
                await queue.put((p, frame))
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


async def _prefixed(first: protocol.Frame, gen: AsyncIterator[protocol.Frame]) -> AsyncIterator[protocol.Frame]:
    yield first
    async for frame in gen:
        yield frame


async def _stream_body(
    gens: list[AsyncIterator[protocol.Frame]],
    firsts: list[protocol.Frame],
    plan: CompletionPlan,
    model: str,
    request_id: str,
) -> AsyncIterator[bytes]:
    created = int(time.time())
    prompts: dict[int, protocol.Prompt] = {}
    states: dict[int, _StreamChoice] = {}
    prompt_tokens = completion_tokens = 0
    try:
        async for p, frame in _merge([_prefixed(f, g) for f, g in zip(firsts, gens)]):
            if isinstance(frame, protocol.Delta):
                index = p * plan.n + frame.index
                state = states.get(index)
                if state is None:
                    state = states[index] = _StreamChoice()
                text, entries = frame.text, frame.logprobs or []
                if not state.started:
                    state.started = True
                    if plan.echo:
                        prompt = plan.prompts[p]
                        pf = prompts.get(p)
                        text = (prompt if isinstance(prompt, str) else (pf.text if pf else "") or "") + text
                        entries = list((pf.logprobs if pf else None) or []) + entries
                logprobs: CompletionLogprobs | None = None
                if plan.logprobs is not None:
                    logprobs = completion_logprobs(entries, plan.logprobs, state.offset)
                    state.offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else state.offset
                choice = CompletionChoice(index, text, logprobs, finish_reason(frame.finish_reason))  # type: ignore[arg-type]
                yield sse(_json.encode(_Chunk(request_id, created, model, [choice])))
            elif isinstance(frame, protocol.Prompt):
                prompts[p] = frame
            elif isinstance(frame, protocol.Done):
                prompt_tokens += frame.prompt_tokens
                completion_tokens += frame.completion_tokens
            else:
                raise_for_frame(frame)
    except FleetError as e:
        yield error_event(e)
        yield DONE_EVENT
        return
    if plan.include_usage:
        usage = Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        yield sse(_json.encode(_Chunk(request_id, created, model, [], usage)))
    yield DONE_EVENT
