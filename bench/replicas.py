"""Replicas and routing, measured on this machine's CPU: a shared-prefix workload under the
`prefix` policy and under `least-loaded`, on a fleet with two replicas of the default model.

    python bench/replicas.py --policies prefix,least-loaded --rounds 2 --out /tmp/replicas

Each request is one of `--systems` long system prompts (distinct from their first characters on)
followed by a question of its own; `--concurrency` clients send `--requests` requests back to
back, streaming, `--max-tokens` tokens each. Reported per policy: TTFT p50/p90 (bench/loadgen.py)
and the prefix-cache hit rate, which each engine counts itself (GET /stats on the engine:
prompt tokens of finished requests, and how many of them vLLM's prefix cache held).

Throughput of 1 vs 2 replicas is bench/referee.py's: `--systems fleet-2r,fleet`.

On two GPUs (`--gpus 0,1`: one replica on each, `--source` a model folder, each engine's KV cache
`--kv-cache-gib`), sized so that the system prompts fill more than one replica's cache and fit in
both (the default model: ~1.1 tokens a word, 23 KB of KV cache a token; 64 prompts of 1,200 words
are ~83,000 tokens, 1.9 GB, against 1 GiB a replica):

    python3 bench/replicas.py --gpus 0,1 --source /root/models/smollm2-135m-instruct --kv-cache-gib 1 \
        --systems 64 --words 1200 --requests 2048 --concurrency 64 --rounds 2 --out /tmp/replicas-gpu
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ("river", "copper", "lantern", "orbit", "meadow", "signal", "harbor", "quartz", "falcon", "ember",
         "canyon", "violet", "anchor", "tundra", "saffron", "glacier")


def system_prompts(count: int, words: int) -> list[str]:
    """`count` long system prompts, each different from its first characters on (the prefix policy
    keys on a prompt's first 256 characters)."""
    return [f"System prompt {k} of {count}. " + " ".join(WORDS[(k * 7 + i * (k + 3)) % len(WORDS)] for i in range(words))
            for k in range(count)]


def prompts(systems: list[str], requests: int) -> list[str]:
    return [f"{systems[i % len(systems)]}\nQuestion {i}: what is {i} plus {i * 3}?\nAnswer:" for i in range(requests)]


async def engine_counts(base_url: str) -> dict[str, dict[str, int]]:
    """Each replica's own /stats, found through the gateway's /fleet/status."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base_url}/fleet/status") as r:
            rows = (await r.json())["models"]
        out = {}
        for row in rows:
            async with http.get(f"http://127.0.0.1:{row['port']}/stats") as r:
                out[row["replica"]] = await r.json()
        return out


@contextlib.asynccontextmanager
async def launched(policy: str, env: Any, model_dir: str, ns: argparse.Namespace) -> AsyncIterator[Any]:
    """Two replicas under `policy`: the CPU build's shared settings, or (--gpus) one per GPU."""
    from bench import systems

    if not ns.gpus:
        async with systems.fleet_launch(env, source=model_dir, wait_ready=True, replicas=2, routing=policy) as running:
            yield running
        return
    from bench.procs import free_ports
    from bench.sleep import Fleet

    ports = free_ports(2)
    places = ", ".join(f"{{ gpus = [{g}], port = {ports + k} }}" for k, g in enumerate(ns.gpus.split(",")))
    tables = (f'[[models]]\nname = "{systems.MODEL_NAME}"\nsource = "{model_dir}"\nplacements = [{places}]\n'
              f'routing = "{policy}"\nmax_model_len = 4096\nkv_cache_gib = {ns.kv_cache_gib}\n')
    env.workdir.mkdir(parents=True, exist_ok=True)
    async with Fleet(env.workdir, f"fleet-{policy}", tables) as fleet:
        yield systems.Running("fleet-2r", fleet.url, systems.MODEL_NAME, fleet.server.pid, [fleet.server.pid], 0.0, 0.0)


async def measure(policy: str, env: Any, model_dir: str, ns: argparse.Namespace) -> dict[str, Any]:
    from bench.loadgen import closed_loop, completion_target, summarize

    texts = prompts(system_prompts(ns.systems, ns.words), ns.requests)
    async with launched(policy, env, model_dir, ns) as running:
        warm = completion_target(running.base_url, running.model, ["Hello, my name is"] * 4, 4, stream=True)
        await closed_loop(warm, 2, 4, timeout=300)  # the first requests of a fresh engine are slow
        before = await engine_counts(running.base_url)
        target = completion_target(running.base_url, running.model, texts, ns.max_tokens, stream=True)
        run = await closed_loop(target, ns.concurrency, ns.requests, timeout=600)
        after = await engine_counts(running.base_url)
    per_replica = {name: {k: after[name][k] - before[name].get(k, 0) for k in ("requests", "prompt_tokens", "cached_tokens")}
                   for name in after}
    prompt_tokens = sum(r["prompt_tokens"] for r in per_replica.values())
    cached = sum(r["cached_tokens"] for r in per_replica.values())
    summary = summarize(run)
    return {"policy": policy, "ttft_ms": summary["ttft_ms"], "latency_ms": summary["latency_ms"],
            "ok": summary["ok"], "errors": summary["errors"], "wall_s": summary["wall_s"],
            "hit_rate": round(cached / prompt_tokens, 3) if prompt_tokens else None, "replicas": per_replica}


def main() -> None:
    from bench import systems
    from bench.run import model_dir as default_model_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="prefix,least-loaded", help="in the order run; rounds alternate it")
    ap.add_argument("--systems", type=int, default=8, help="distinct system prompts")
    ap.add_argument("--words", type=int, default=300, help="words per system prompt (~1.3 tokens each)")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gpus", default="", help="one replica on each of these GPUs (e.g. 0,1); none: the CPU")
    ap.add_argument("--source", default="", help="with --gpus: the model folder (default: the packaged model's)")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0, help="with --gpus: each engine's KV cache")
    ap.add_argument("--out", type=Path, default=Path("/tmp/replicas"))
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    model_dir = ns.source or default_model_dir(sys.executable)
    names = ns.policies.split(",")
    results: dict[str, Any] = {"cpu": systems.describe(systems.Env(ns.out)), "settings": {
        k: v for k, v in vars(ns).items() if k != "out"}, "runs": []}
    for k in range(ns.rounds):
        for policy in names if k % 2 == 0 else names[::-1]:
            env = systems.Env(ns.out / f"r{k + 1}-{policy}")
            print(f"round {k + 1}, {policy}", flush=True)
            point = asyncio.run(measure(policy, env, model_dir, ns))
            point.update(round=k + 1, started=time.strftime("%H:%M:%S", time.gmtime()))
            results["runs"].append(point)
            ttft = point["ttft_ms"] or {}
            print(f"  TTFT p50 {ttft.get('p50')} ms, p90 {ttft.get('p90')} ms; prefix-cache hit rate {point['hit_rate']}; "
                  f"{point['ok']} ok, {point['errors']} errors; per replica {point['replicas']}", flush=True)
            (ns.out / "replicas.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
