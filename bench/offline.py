"""The engine's ceiling: vLLM's offline `LLM.generate` on the benchmark's prompts, no server at all.

    python bench/offline.py --model <dir> --spec '<JSON>' --out result.json

The spec gives the prompts, max_tokens, the engine settings and the load points
``[[concurrency, requests], ...]``. Every request asks for exactly max_tokens tokens (ignore_eos).

- With ``window`` in the spec (what run.py uses): a closed loop on `LLM.llm_engine` itself,
  `concurrency` requests always in flight, tokens counted for `window` seconds after `ramp`:
  the same measurement as the servers get, without HTTP, SSE or an asyncio front end.
- Without: each point runs its requests in waves of `concurrency` prompts (one `LLM.generate`
  call per wave); all requests of a wave finish together, which is what a closed loop of
  `concurrency` clients keeps in flight.
- With ``turns`` (bench/gpu.py --interleave): loaded once, then one windowed point per line
  ``{"concurrency": c}`` on stdin, answered by a line ``point <JSON>`` on stdout, so that the
  offline engine takes its turns between a server's points, as the servers take theirs.
- With ``turns`` and ``async`` (bench/gpu.py's system ``engine``): the same turns on vLLM's
  AsyncLLM, built as `vllm serve` and fleet's engine build it (their usage context), driven by
  `concurrency` asyncio tasks that each stream one request at a time (DELTA outputs) and start
  the next as it ends: both servers' engine loop without HTTP, the most a front end could make
  of this engine at that concurrency. (The synchronous `step()` loop above is no such ceiling at
  small concurrencies: it adds requests only between steps.)
Run by bench/run.py in a subprocess (vLLM spawns processes: the `__main__` guard is required).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(prog="offline.py", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--spec", required=True, help="JSON: prompts, max_tokens, engine, points")
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args()
    spec = json.loads(ns.spec)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

    started = time.monotonic()
    if spec.get("turns") and spec.get("async"):
        run_async_turns(ns.model, spec, started)
        return
    from vllm import LLM, SamplingParams

    e = spec["engine"]
    # Only the settings the spec names; the rest are vLLM's defaults (the GPU run passes a memory
    # fraction and leaves the batch limits and compilation to vLLM, as its servers there do).
    settings = {k: e[k] for k in ("enforce_eager", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization") if k in e}
    if "kv_cache_gib" in e:
        settings["kv_cache_memory_bytes"] = int(e["kv_cache_gib"] * (1 << 30))
    llm = LLM(model=ns.model, max_model_len=e["max_model_len"], disable_log_stats=True, **settings)
    load_s = time.monotonic() - started
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    prompts: list[str] = spec["prompts"]
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up, as the servers get

    if spec.get("turns"):  # bench/gpu.py --interleave: one point per line on stdin, each answered on stdout
        print("ready", flush=True)
        for line in sys.stdin:
            point = {**spec, "points": [[json.loads(line)["concurrency"], 0]]}
            print("point " + json.dumps(windowed(llm, params, prompts, point)[0]), flush=True)
        return
    if spec.get("window"):
        points = windowed(llm, params, prompts, spec)
        ns.out.write_text(json.dumps({"load_s": round(load_s, 1), "points": points}))
        return
    points = []
    for concurrency, requests in spec["points"]:
        done = tokens = 0
        t0 = time.perf_counter()
        while done < requests:
            batch = [prompts[(done + i) % len(prompts)] for i in range(min(concurrency, requests - done))]
            outs = llm.generate(batch, params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            done += len(batch)
        wall = time.perf_counter() - t0
        points.append({
            "mode": "offline", "concurrency": concurrency, "requests": requests, "ok": done, "errors": 0,
            "wall_s": round(wall, 3), "req_per_s": round(done / wall, 3),
            "output_tok_per_s": round(tokens / wall, 2), "output_tokens": tokens,
        })
        print(f"offline c={concurrency}: {done / wall:.2f} req/s, {tokens / wall:.1f} tok/s", flush=True)
    ns.out.write_text(json.dumps({"load_s": round(load_s, 1), "points": points}))


def windowed(llm: object, params: object, prompts: list[str], spec: dict) -> list[dict]:
    """Closed loop on the engine itself: keep `concurrency` requests in flight (a finished one is
    replaced at once), count tokens for `window` seconds after `ramp`, then abort the rest."""
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine  # type: ignore[attr-defined]
    params = params.clone()  # type: ignore[attr-defined]
    params.output_kind = RequestOutputKind.DELTA
    window, ramp, ramp_max = spec["window"], spec.get("ramp", 0.0), spec.get("ramp_max", 0.0)
    max_seqs = spec["engine"].get("max_num_seqs", 1 << 30)
    points = []
    for concurrency, _ in spec["points"]:
        active: set[str] = set()
        streaming: set[str] = set()  # requests that produced a token
        counter = tokens = done = 0
        t_start = time.perf_counter()
        t0 = t1 = float("inf")  # the window opens after the ramp (and the prefill burst), as for the servers
        started_at: dict[str, float] = {}
        latencies = []
        while True:
            now = time.perf_counter()
            if t0 == float("inf") and now - t_start >= ramp and (
                len(streaming) >= min(concurrency, max_seqs) or now - t_start >= ramp_max
            ):
                t0, t1 = now, now + window
            if now >= t1:
                break
            while len(active) < concurrency:
                rid = f"b{concurrency}-{counter}"  # outputs carry this id (vLLM adds a suffix internally)
                engine.add_request(rid, prompts[counter % len(prompts)], params)
                started_at[rid] = time.perf_counter()
                active.add(rid)
                counter += 1
            if not engine.has_unfinished_requests():  # step() would block for ever
                raise RuntimeError(f"no request in flight although {len(active)} are not finished: {sorted(active)[:3]}")
            for out in engine.step():
                now = time.perf_counter()
                if out.outputs[0].token_ids:
                    streaming.add(out.request_id)
                if t0 <= now < t1:
                    tokens += len(out.outputs[0].token_ids)
                if out.finished:
                    active.discard(out.request_id)
                    began = started_at.pop(out.request_id, now)
                    if began >= t0 and now < t1:
                        done += 1
                        latencies.append(now - began)
        if active:
            engine.abort_request(list(active))
        while engine.has_unfinished_requests():
            engine.step()
        latencies.sort()
        points.append({
            "mode": "offline-window", "concurrency": concurrency, "requests": done, "ok": done, "errors": 0,
            "window_s": window, "ramp_s": round(t0 - t_start, 2), "started": counter, "wall_s": round(window, 3),
            "req_per_s": round(done / window, 3), "output_tok_per_s": round(tokens / window, 2), "output_tokens": tokens,
            "latency_ms": {"p50": round(1e3 * latencies[len(latencies) // 2], 1)} if latencies else None,
        })
        print(f"offline c={concurrency}: {tokens / window:.1f} tok/s, {done} requests finished in the window", flush=True)
    return points


def run_async_turns(model: str, spec: dict, started: float) -> None:
    """`turns` on AsyncLLM (spec "async"), on uvloop as both servers run."""
    try:
        import uvloop

        uvloop.run(async_turns(model, spec, started))
    except ImportError:
        asyncio.run(async_turns(model, spec, started))
    sys.stdout.flush()
    os._exit(0)  # shut down already: skip the interpreter's teardown of vLLM (and AsyncLLM.__del__'s noise)


async def async_turns(model: str, spec: dict, started: float) -> None:
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    e = spec["engine"]
    settings = {k: e[k] for k in ("enforce_eager", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization") if k in e}
    args = AsyncEngineArgs(model=model, max_model_len=e["max_model_len"], disable_log_stats=True, **settings)
    engine = AsyncLLM.from_engine_args(args, usage_context=UsageContext.OPENAI_API_SERVER)
    try:
        params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA)
        prompts: list[Any] = spec["prompts"]
        if tools := spec.get("tools"):
            prompts, params = tool_calls(engine.get_tokenizer(), prompts, spec["max_tokens"], tools)
        async for _ in engine.generate(prompts[0], params, "warm-up"):  # as the servers get
            pass
        gc.collect()  # as both servers' processes freeze what start-up built (vllm serve's API server,
        gc.freeze()  # fleet's engine process): no full collection walks vLLM's objects while measuring
        print(f"ready (loaded in {time.monotonic() - started:.1f}s)", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            concurrency = json.loads(line)["concurrency"]
            print("point " + json.dumps(await async_point(engine, params, prompts, concurrency, spec)), flush=True)
    finally:
        engine.shutdown()


def tool_calls(tokenizer: Any, prompts: list[str], max_tokens: int, tools: dict) -> tuple[list[Any], Any]:
    """The servers' named tool calls (bench/loadgen.py's tool_call_target) as the engine gets them
    from either server: each prompt a user message rendered by the chat template with the tool
    (tokens, rendered once here: a server does it per request), sampled greedily under structured
    outputs holding the answer to the function's parameters, at most `max_tokens`, no ignore_eos."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    if tools["choice"] != "named":
        raise SystemExit("the engine without a server measures named tool calls only")
    tool = tools["tool"]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tools=[tool], add_generation_prompt=True,
                                           tokenize=False) for p in prompts]
    rendered = [{"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)} for text in texts]
    schema = json.dumps(tool["function"]["parameters"])
    return rendered, SamplingParams(max_tokens=max_tokens, temperature=0.0, output_kind=RequestOutputKind.DELTA,
                                    structured_outputs=StructuredOutputsParams(json=schema))


async def async_point(engine: Any, params: Any, prompts: list[Any], concurrency: int, spec: dict) -> dict:
    """One windowed point on AsyncLLM: `concurrency` tasks, each streaming requests one after
    another; tokens counted for `window` seconds once every task's request streams (after `ramp`,
    at most `ramp_max`), then every task cancelled (which aborts its request in vLLM)."""
    window, ramp, ramp_max = spec["window"], spec.get("ramp", 0.0), spec.get("ramp_max", 0.0)
    max_seqs = spec["engine"].get("max_num_seqs", 1 << 30)
    ids = itertools.count()
    streaming: set[str] = set()
    everyone = asyncio.Event()  # every task's request streams: the window may open
    latencies: list[float] = []
    tokens = done = 0
    t0 = t1 = float("inf")

    async def client() -> None:
        nonlocal tokens, done
        while True:
            k = next(ids)
            rid, began = f"a{concurrency}-{k}", time.perf_counter()
            async for out in engine.generate(prompts[k % len(prompts)], params, rid):
                now = time.perf_counter()
                n = len(out.outputs[0].token_ids)
                if n and rid not in streaming:
                    streaming.add(rid)
                    if len(streaming) >= min(concurrency, max_seqs):
                        everyone.set()
                if t0 <= now < t1:
                    tokens += n
            now = time.perf_counter()
            if began >= t0 and now < t1:
                done += 1
                latencies.append(now - began)

    t_start = time.perf_counter()
    tasks = [asyncio.create_task(client()) for _ in range(concurrency)]
    await asyncio.sleep(ramp)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(everyone.wait(), max(0.0, ramp_max - (time.perf_counter() - t_start)))
    t0 = time.perf_counter()
    t1 = t0 + window
    await asyncio.sleep(window)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(1000):  # the aborts reach the engine: the next point starts on an empty engine
        if not engine.output_processor.has_unfinished_requests():
            break
        await asyncio.sleep(0.005)
    latencies.sort()
    print(f"engine c={concurrency}: {tokens / window:.1f} tok/s, {done} requests finished in the window", flush=True)
    return {
        "mode": "asyncllm-window", "concurrency": concurrency, "requests": done, "ok": done, "errors": 0,
        "window_s": window, "ramp_s": round(t0 - t_start, 2), "started": next(ids), "wall_s": round(window, 3),
        "req_per_s": round(done / window, 3), "output_tok_per_s": round(tokens / window, 2), "output_tokens": tokens,
        "latency_ms": {"p50": round(1e3 * latencies[len(latencies) // 2], 1)} if latencies else None,
    }


if __name__ == "__main__":
    main()
