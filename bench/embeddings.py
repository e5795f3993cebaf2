"""Embeddings throughput: fleet vs `vllm serve`, the same model (the packaged default, converted to
an embedding model by vLLM's pooling runner in both), the same inputs, in one run.

    python bench/embeddings.py --batch 1,8,32 --concurrency 4 --requests 64 --rounds 2 --out /tmp/emb
    # on a CUDA GPU (the offline kit's vLLM), each system alone on GPU 0 in turn:
    PYTHONPATH=/root/site:. python3 bench/embeddings.py --gpu /root/models/smollm2-135m-instruct \
        --batch 1,8,32 --concurrency 16 --requests 800 --rounds 2 --out $OUT

Each point is a closed loop of `--concurrency` clients sending `--requests` POST /v1/embeddings in
all, each with `--batch` inputs (the same short sentences for both systems, ~12 tokens each); it
counts inputs embedded per second (and tokens, from each answer's usage). Rounds alternate the
order of the systems; each system is started once per round and warmed up before it is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import systems

SENTENCES = [
    "The capital of France is Paris, a city on the Seine.",
    "Embeddings map a text to a vector of numbers.",
    "A fleet serves many models behind one endpoint.",
    "The quick brown fox jumps over the lazy dog.",
    "vLLM batches requests to keep the processor busy.",
    "Retrieval finds the documents nearest to a query.",
    "Cosine similarity compares the directions of two vectors.",
    "A benchmark is only as good as its side-by-side run.",
]


def inputs(batch: int, k: int) -> list[str]:
    """`batch` inputs for request number `k`: distinct texts, so no answer is a cache's."""
    return [f"{SENTENCES[(k + i) % len(SENTENCES)]} ({k}.{i})" for i in range(batch)]


async def point(base_url: str, model: str, batch: int, concurrency: int, requests: int) -> dict[str, Any]:
    """A closed loop of `concurrency` clients; inputs and tokens per second over the whole point."""
    import aiohttp

    counter = iter(range(requests))
    tokens = done = 0
    latencies: list[float] = []

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal tokens, done
        for k in counter:
            began = time.perf_counter()
            async with session.post(f"{base_url}/v1/embeddings", json={"model": model, "input": inputs(batch, k)}) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {body}")
            latencies.append(time.perf_counter() - began)
            tokens += body["usage"]["prompt_tokens"]
            done += len(body["data"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        began = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        took = time.perf_counter() - began
    return {"batch": batch, "concurrency": concurrency, "requests": requests, "seconds": round(took, 3),
            "inputs_per_s": round(done / took, 2), "tokens_per_s": round(tokens / took, 1),
            "latency_p50_ms": round(statistics.median(latencies) * 1000, 1)}


@contextlib.asynccontextmanager
async def system(name: str, env: systems.Env, model_dir: str) -> AsyncIterator[systems.Running]:
    if name == "fleet":
        async with systems.fleet_launch(env, source=model_dir, wait_ready=True, task="embed") as running:
            yield running
    elif name == "vllm":
        async with systems.vllm_serve(env, model_dir, task="embed") as running:
            yield running
    else:
        raise SystemExit(f"unknown system {name!r}: fleet or vllm")


async def measure(name: str, env: systems.Env, model_dir: str, batches: Sequence[int], concurrency: int,
                  requests: int) -> list[dict[str, Any]]:
    async with system(name, env, model_dir) as running:
        return await points(running.base_url, running.model, batches, concurrency, requests)


async def points(base_url: str, model: str, batches: Sequence[int], concurrency: int, requests: int) -> list[dict[str, Any]]:
    """A warm-up, then one point per batch size."""
    await point(base_url, model, max(batches), concurrency, concurrency * 2)
    return [await point(base_url, model, b, concurrency, requests) for b in batches]


def measure_gpu(name: str, model_dir: str, memory: float, out: Path, batches: Sequence[int], concurrency: int,
                requests: int) -> list[dict[str, Any]]:
    """One system alone on GPU 0 (bench/gpu.py's way of starting and stopping it), the model as an embedding model."""
    import os

    from bench.gpu import started

    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    if name == "fleet":
        toml = out / "fleet-embed.toml"
        toml.write_text(f'[gateway]\nport = 8000\n\n[[models]]\nname = "m"\nsource = "{model_dir}"\ntask = "embed"\n'
                        f"placements = [{{ gpus = [0], port = 5001 }}]\nmax_model_len = 2048\n"
                        f"gpu_memory_utilization = {memory}\n")
        argv = [sys.executable, "-m", "fleet.cli", "launch", "--config", str(toml), "--no-engine-logs"]
        health, base = "http://127.0.0.1:8000/fleet/status", "http://127.0.0.1:8000"
        env["FLEET_LOG_DIR"] = str(out / "fleet-engine-logs")
    elif name == "vllm":
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                "--served-model-name", "m", "--port", "8100", "--max-model-len", "2048",
                "--gpu-memory-utilization", str(memory), "--runner", "pooling", "--convert", "embed"]
        health, base = "http://127.0.0.1:8100/health", "http://127.0.0.1:8100"
    else:
        raise SystemExit(f"unknown system {name!r}: fleet or vllm")
    with started(name, argv, health, env, out):
        return asyncio.run(points(base, "m", batches, concurrency, requests))


def gpu_name() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        return "no NVIDIA GPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="fleet,vllm")
    p.add_argument("--batch", default="1,8,32", help="inputs per request, one point each")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=64, help="requests per point")
    p.add_argument("--rounds", type=int, default=2, help="each round reverses the order of the systems")
    p.add_argument("--out", type=Path, default=Path("/tmp/fleet-bench-embeddings"))
    p.add_argument("--gpu", default="", help="a model folder: run on CUDA GPU 0 instead (the offline kit's vLLM)")
    p.add_argument("--memory", type=float, default=0.8, help="--gpu: gpu_memory_utilization")
    ns = p.parse_args()
    if ns.gpu:
        model_dir = ns.gpu
    else:
        from bench.run import model_dir as default_model_dir

        model_dir = default_model_dir(sys.executable)
    names = ns.systems.split(",")
    batches = [int(b) for b in ns.batch.split(",")]
    runs: list[dict[str, Any]] = []
    for k in range(ns.rounds):
        order = names if k % 2 == 0 else names[::-1]
        run: dict[str, Any] = {"order": order, "systems": {}}
        for name in order:
            if ns.gpu:
                run["systems"][name] = measure_gpu(name, model_dir, ns.memory, ns.out / f"r{k + 1}", batches,
                                                   ns.concurrency, ns.requests)
            else:
                env = systems.Env(ns.out / f"r{k + 1}")
                run["systems"][name] = asyncio.run(measure(name, env, model_dir, batches, ns.concurrency, ns.requests))
            print(f"round {k + 1} {name}: " + ", ".join(f"b={x['batch']} {x['inputs_per_s']}/s" for x in run["systems"][name]),
                  flush=True)
        runs.append(run)
    ns.out.mkdir(parents=True, exist_ok=True)
    where = {"gpu": gpu_name(), "model": model_dir} if ns.gpu else {"cpu": systems.describe(systems.Env(ns.out))}
    (ns.out / "embeddings.json").write_text(json.dumps({**where, "runs": runs}, indent=1))
    if {"fleet", "vllm"} <= set(names):
        print("\nbatch | fleet inputs/s (rounds) | vllm serve inputs/s (rounds) | fleet / vllm serve per round")
        for i, b in enumerate(batches):
            f = [r["systems"]["fleet"][i]["inputs_per_s"] for r in runs]
            v = [r["systems"]["vllm"][i]["inputs_per_s"] for r in runs]
            ratios = " / ".join(f"{a / c:.2f}" for a, c in zip(f, v, strict=True))
            print(f"{b} | {' / '.join(map(str, f))} | {' / '.join(map(str, v))} | {ratios}")


if __name__ == "__main__":
    main()
