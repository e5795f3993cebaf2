"""The load generator: an asyncio + aiohttp client with bounded request counts and durations.

Two ways to offer load, both of which always stop by themselves:

- `closed_loop(target, concurrency, requests)`: `concurrency` workers, each sending its next
  request when the previous one ends, until `requests` were sent (or `max_duration` passed).
  This is how throughput is measured.
- `open_loop(target, rate, requests)`: request i is sent at t0 + i / rate whatever the server
  does (no coordinated omission), `requests` in all. This is how added latency and the highest
  sustained rate are measured.

Targets speak OpenAI's /v1/completions (JSON or SSE) or fleet's internal /generate (msgpack
frames, for the null engine measured directly). Only loopback addresses are allowed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STOP = threading.Event()  # set by run.py on SIGTERM: no new requests anywhere
CDF_POINTS = [*range(100), 99.5, 99.9, 100]


@dataclass(frozen=True)
class Target:
    """One kind of request to one URL: what is sent, and how the answer is read."""

    url: str
    bodies: tuple[bytes, ...]  # request i sends bodies[i % len(bodies)]
    kind: str = "openai"  # "openai" (JSON or SSE) or "fleet" (msgpack frames)
    stream: bool = False
    content_type: str = "application/json"

    def __post_init__(self) -> None:
        host = urlsplit(self.url).hostname
        if host not in LOOPBACK:
            raise ValueError(f"the benchmark only sends load to loopback addresses, not {host!r}")


def completion_target(
    base_url: str, model: str, prompts: Sequence[str], max_tokens: int, *, stream: bool, ignore_eos: bool = True,
) -> Target:
    """POST {base_url}/v1/completions with greedy sampling and (with ignore_eos) exactly max_tokens tokens."""
    bodies = []
    for prompt in prompts:
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        if ignore_eos:
            body["ignore_eos"] = True
        if stream:  # usage in every chunk: tokens are counted, not chunks (see chunk_tokens)
            body["stream"] = True
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        bodies.append(_json_encode(body))
    return Target(f"{base_url}/v1/completions", tuple(bodies), "openai", stream)


def tool_call_target(base_url: str, model: str, prompts: Sequence[str], max_tokens: int, tool: dict[str, Any],
                     tool_choice: Any) -> Target:
    """Streamed POST {base_url}/v1/chat/completions, greedy, offering `tool` under `tool_choice`
    (named or "required": every answer is the call's arguments under structured outputs), usage in
    every chunk: the tokens of a tool call are counted, though it has no content."""
    bodies = tuple(
        _json_encode({"model": model, "messages": [{"role": "user", "content": prompt}], "tools": [tool],
                      "tool_choice": tool_choice, "max_completion_tokens": max_tokens, "temperature": 0.0,
                      "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        for prompt in prompts
    )
    return Target(f"{base_url}/v1/chat/completions", bodies, "openai", True)


def generate_target(engine_url: str, prompts: Sequence[str], max_tokens: int) -> Target:
    """POST {engine_url}/generate: fleet's internal protocol, as the gateway sends it."""
    from fleet.wire import protocol

    bodies = tuple(
        protocol.encode(protocol.GenerateRequest(
            request_id=f"bench-{i}", prompt=prompt,
            sampling=protocol.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        ))
        for i, prompt in enumerate(prompts)
    )
    return Target(f"{engine_url}/generate", bodies, "fleet", False, "application/msgpack")


@dataclass
class Sample:
    """One request's outcome; times in seconds."""

    ok: bool
    latency: float = 0.0  # from sending to the last byte
    ttft: float | None = None  # streaming: to the first chunk that carries text
    tokens: int = 0
    error: str | None = None
    finish: str | None = None  # the finish reason of its (first) choice
    lag: float = 0.0  # open loop: how late the client sent it (actual - scheduled)
    start: float = 0.0  # perf_counter when it was sent


class Progress:
    """What every request of a run received so far (a windowed run snapshots it)."""

    chunks = 0  # SSE chunks that carried text
    tokens = 0  # output tokens in them, counted as `counted_by` says
    first_tokens = 0  # requests that received their first text chunk
    counted_by: set[str]

    def __init__(self) -> None:
        self.counted_by = set()


def chunk_tokens(event: dict[str, Any], seen: dict[int, int]) -> tuple[int, str]:
    """The output tokens one streamed chunk carries, and how they were counted.

    A server that falls behind merges several engine steps into one chunk (vLLM's output collector
    does), so one chunk is not one token. In order of preference: the chunk's continuous usage
    (`stream_options.continuous_usage_stats`: its choice's completion tokens so far, minus what that
    choice had before), its logprob entries (one per token), and only then one per text chunk.
    `seen` keeps each choice's running count between chunks.
    """
    choices = event.get("choices") or []
    usage = event.get("usage")
    if usage and choices and usage.get("completion_tokens") is not None:
        index = choices[0].get("index", 0)
        so_far = usage["completion_tokens"]
        new = so_far - seen.get(index, 0)
        seen[index] = so_far
        return new, "continuous_usage"
    tokens, text = 0, False
    for choice in choices:
        logprobs = choice.get("logprobs")
        if logprobs:
            entries = logprobs.get("tokens") if "tokens" in logprobs else logprobs.get("content")
            tokens += len(entries or [])
        delta = choice.get("delta") or {}
        text = text or bool(choice.get("text") or delta.get("content") or delta.get("tool_calls"))
    if tokens:
        return tokens, "logprobs"
    return (1, "chunks") if text else (0, "chunks")


async def _read_sse(resp: aiohttp.ClientResponse, start: float, sample: Sample, progress: Progress | None = None) -> None:
    counted = 0
    usage_tokens = None
    seen: dict[int, int] = {}
    async for line in resp.content:
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        event = _json_decode(payload)
        if "error" in event:
            raise RuntimeError(f"error event: {str(event['error'])[:200]}")
        choices = event.get("choices") or []
        if not choices:  # the final usage chunk: the request's own count
            if usage := event.get("usage"):
                usage_tokens = usage.get("completion_tokens")
            continue
        if reason := choices[0].get("finish_reason"):
            sample.finish = reason
        tokens, how = chunk_tokens(event, seen)
        if tokens == 0:
            continue
        counted += tokens
        if progress is not None:
            progress.chunks += 1
            progress.tokens += tokens
            progress.counted_by.add(how)
        if sample.ttft is None:
            sample.ttft = time.perf_counter() - start
            if progress is not None:
                progress.first_tokens += 1
    sample.tokens = usage_tokens if usage_tokens is not None else counted


def _read_frames(body: bytes) -> int:
    from fleet.wire import protocol

    tokens, pos, header = 0, 0, protocol.FRAME_HEADER
    while pos < len(body):
        (size,) = header.unpack_from(body, pos)
        frame = protocol.decode_frame(body[pos + 4:pos + 4 + size])
        pos += 4 + size
        if isinstance(frame, protocol.Done):
            return frame.completion_tokens
        if isinstance(frame, protocol.Error):
            raise RuntimeError(f"engine error frame: {frame.message}")
    raise RuntimeError(f"no Done frame ({tokens} tokens)")


async def send(session: aiohttp.ClientSession, target: Target, timeout: float, index: int = 0,
               progress: Progress | None = None) -> Sample:
    """Request `index`; never raises (errors are samples with ok=False)."""
    sample = Sample(ok=False)
    body = target.bodies[index % len(target.bodies)]
    start = sample.start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(target.url, data=body, headers={"Content-Type": target.content_type}) as resp:
                if resp.status != 200:
                    text = (await resp.read())[:200].decode(errors="replace")
                    raise RuntimeError(f"HTTP {resp.status}: {text}")
                if target.stream:
                    await _read_sse(resp, start, sample, progress)
                elif target.kind == "fleet":
                    sample.tokens = _read_frames(await resp.read())
                else:
                    body = _json_decode(await resp.read())
                    if not body.get("choices"):
                        raise RuntimeError(f"no choices: {str(body)[:200]}")
                    sample.tokens = (body.get("usage") or {}).get("completion_tokens", 0)
        sample.ok = True
    except TimeoutError:
        sample.error = f"timeout after {timeout:g}s"
    except Exception as e:  # every failure is data
        sample.error = f"{type(e).__name__}: {e}"[:300]
    sample.latency = time.perf_counter() - start
    return sample


def _session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections, ttl_dns_cache=None),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        auto_decompress=False,
    )


@dataclass
class RunResult:
    """The samples of one load point and how long it took."""

    samples: list[Sample]
    wall: float  # from the first send to the last answer
    offered: int  # requests the run meant to send
    mode: str
    concurrency: int | None = None
    rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def closed_loop(
    target: Target, concurrency: int, requests: int, *, timeout: float = 300.0, max_duration: float = 600.0,
) -> RunResult:
    """`concurrency` workers send `requests` requests back to back; stops at `max_duration` too."""
    samples: list[Sample] = []
    next_index = 0
    deadline = time.perf_counter() + max_duration

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline and not STOP.is_set():
            index = next_index
            next_index += 1
            left = max(0.1, deadline - time.perf_counter())
            samples.append(await send(session, target, min(timeout, left), index))

    async with _session(concurrency) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, requests))))
        wall = time.perf_counter() - start
    return RunResult(samples, wall, requests, "closed", concurrency=concurrency)


async def closed_window(
    target: Target, concurrency: int, window: float, *, ramp: float = 0.0, timeout: float = 600.0,
    streaming_clients: int = 0, ramp_max: float = 0.0,
) -> RunResult:
    """`concurrency` workers back to back; measure for `window` seconds after `ramp` seconds.

    With `streaming_clients`, the ramp also lasts until that many requests have received their
    first token (the server is past the prefill burst and decoding), but at most `ramp_max`.

    Streamed targets only. What counts: output tokens received inside the window (`chunk_tokens`:
    a chunk may carry several), and requests that both started and finished inside it.
    When the window closes every request still running is cancelled (its connection closes, the
    server aborts it), so a point takes ramp + window seconds however slow the server is.
    """
    progress = Progress()
    samples: list[Sample] = []
    counter = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal counter
        while not STOP.is_set():
            index = counter
            counter += 1
            samples.append(await send(session, target, timeout, index, progress))

    async with _session(concurrency) as session:
        tasks = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        try:
            ramp_start = time.perf_counter()
            await asyncio.sleep(ramp)
            while progress.first_tokens < streaming_clients and time.perf_counter() - ramp_start < ramp_max:
                await asyncio.sleep(0.1)
            ramp = time.perf_counter() - ramp_start
            t0, chunks0, tokens0 = time.perf_counter(), progress.chunks, progress.tokens
            await asyncio.sleep(window)
            t1, chunks1, tokens1 = time.perf_counter(), progress.chunks, progress.tokens
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    inside = [x for x in samples if x.start >= t0 and x.start + x.latency <= t1]
    run = RunResult(inside, t1 - t0, len(inside), "window", concurrency=concurrency)
    run.extra = {"window_tokens": tokens1 - tokens0, "window_chunks": chunks1 - chunks0, "ramp_s": round(ramp, 2),
                 "started": counter, "errors_any_time": sum(1 for x in samples if not x.ok),
                 "counted_by": sorted(progress.counted_by)}
    return run


def _window_in_process(args: tuple[Target, int, float, dict[str, Any]]) -> tuple[RunResult, float]:
    import resource

    target, concurrency, window, kw = args
    run = asyncio.run(closed_window(target, concurrency, window, **kw))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return run, usage.ru_utime + usage.ru_stime


def closed_window_procs(target: Target, concurrency: int, window: float, procs: int, **kw: Any) -> RunResult:
    """`closed_window` split over `procs` client processes (concurrency / procs clients each, the
    same ramp and window), merged: for servers fast enough that one Python client process would be
    the limit. `extra["client_cpu_s"]` is each client process's CPU time."""
    import multiprocessing

    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    jobs = [(target, n, window, {**kw, "streaming_clients": min(n, kw.get("streaming_clients", n))}) for n in shares if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        done = pool.map(_window_in_process, jobs)
    runs = [run for run, _ in done]
    merged = merge_runs(runs)
    merged.wall = sum(r.wall for r in runs) / len(runs)  # side by side, not one after the other
    merged.concurrency = concurrency
    merged.extra["client_cpu_s"] = [round(cpu, 2) for _, cpu in done]
    return merged


async def open_loop(
    target: Target, rate: float, requests: int, *, timeout: float = 10.0, max_duration: float = 120.0,
    connections: int = 1024,
) -> RunResult:
    """Send request i at t0 + i/rate (`requests` in all); latency counts from the scheduled time's send."""
    samples: list[Sample] = []
    tasks: set[asyncio.Task[None]] = set()

    async def one(session: aiohttp.ClientSession, index: int, scheduled: float) -> None:
        lag = time.perf_counter() - scheduled
        s = await send(session, target, timeout, index)
        s.lag = lag
        samples.append(s)

    async with _session(connections) as session:
        start = time.perf_counter()
        deadline = start + max_duration
        i = 0
        while i < requests and time.perf_counter() < deadline and not STOP.is_set():
            now = time.perf_counter()
            due = min(requests, int((now - start) * rate) + 1)
            while i < due:
                t = asyncio.create_task(one(session, i, start + i / rate))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                i += 1
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.1, deadline - time.perf_counter()) + timeout)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    unsent = requests - i
    samples += [Sample(ok=False, error="not sent: max_duration reached")] * unsent
    return RunResult(samples, wall, requests, "open", rate=rate)


def merge_runs(runs: Sequence[RunResult]) -> RunResult:
    """Several runs of one point (rounds) as one: samples pooled, wall times and counts summed."""
    first = runs[0]
    merged = RunResult([s for r in runs for s in r.samples], sum(r.wall for r in runs), sum(r.offered for r in runs),
                       first.mode, concurrency=first.concurrency, rate=first.rate)
    if first.mode == "window":
        merged.extra = {key: sum(r.extra[key] for r in runs)
                        for key in ("window_tokens", "window_chunks", "started", "errors_any_time")}
        merged.extra["ramp_s"] = first.extra["ramp_s"]
        merged.extra["counted_by"] = sorted({how for r in runs for how in r.extra["counted_by"]})
    return merged


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear interpolation; None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(run: RunResult, *, cdf: bool = False) -> dict[str, Any]:
    """The numbers the report shows for one load point (times in ms)."""
    ok = [s for s in run.samples if s.ok]
    lat = [s.latency * 1e3 for s in ok]
    ttft = [s.ttft * 1e3 for s in ok if s.ttft is not None]
    # time per output token after the first, as `vllm bench serve` counts it
    tpot = [(s.latency - s.ttft) * 1e3 / (s.tokens - 1) for s in ok if s.ttft is not None and s.tokens > 1]
    tokens = sum(s.tokens for s in ok)
    completed_tokens = tokens  # of requests that started and ended inside the window: a floor
    if run.mode == "window":  # every token received in the window, finished request or not
        tokens = run.extra["window_tokens"]
    errors = [s.error for s in run.samples if not s.ok]
    out: dict[str, Any] = {
        "mode": run.mode,
        "concurrency": run.concurrency,
        "rate": run.rate,
        "requests": run.offered,
        "ok": len(ok),
        "errors": len(errors),
        "error_examples": sorted({e or "" for e in errors})[:3],
        "wall_s": round(run.wall, 3),
        "req_per_s": round(len(ok) / run.wall, 3) if run.wall > 0 else 0.0,
        "output_tok_per_s": round(tokens / run.wall, 2) if run.wall > 0 else 0.0,
        "output_tokens": tokens,
        "tokens_per_request": sorted({s.tokens for s in ok})[:5],
    }
    if finishes := [s.finish for s in ok if s.finish is not None]:
        out["finish_reasons"] = {r: finishes.count(r) for r in sorted(set(finishes))}
    for name, values in (("latency_ms", lat), ("ttft_ms", ttft), ("tpot_ms", tpot)):
        if values:
            out[name] = {f"p{q}": round(percentile(values, q), 3) for q in (50, 90, 99)}  # type: ignore[arg-type]
            out[name]["mean"] = round(sum(values) / len(values), 3)
            out[name]["max"] = round(max(values), 3)
        else:
            out[name] = None
    if run.mode == "window":
        chunks = run.extra["window_chunks"]
        out.update({"window_s": round(run.wall, 3), "ramp_s": run.extra["ramp_s"], "started": run.extra["started"],
                    "errors": run.extra["errors_any_time"], "counted_by": run.extra["counted_by"],
                    "window_chunks": chunks, "tokens_per_chunk": round(tokens / chunks, 3) if chunks else None,
                    "completed_tok_per_s": round(completed_tokens / run.wall, 2) if run.wall > 0 else 0.0})
    if run.mode == "open":
        lag = [s.lag * 1e3 for s in ok]
        out["client_lag_ms"] = {"p50": round(percentile(lag, 50), 3), "p99": round(percentile(lag, 99), 3)} if lag else None
        out["late_latency_ms"] = (  # latency counted from the scheduled send time
            {"p50": round(percentile([s.latency * 1e3 + s.lag * 1e3 for s in ok], 50), 3),
             "p99": round(percentile([s.latency * 1e3 + s.lag * 1e3 for s in ok], 99), 3)} if ok else None
        )
    if cdf and lat:
        out["latency_cdf_ms"] = [round(percentile(lat, q), 3) for q in CDF_POINTS]  # type: ignore[arg-type]
        if ttft:
            out["ttft_cdf_ms"] = [round(percentile(ttft, q), 3) for q in CDF_POINTS]  # type: ignore[arg-type]
    return out
