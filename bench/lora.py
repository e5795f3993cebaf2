"""Eight LoRA adapters on one engine against eight merged models each in its own engine (issue 34).

    python bench/lora.py --out /tmp/lora [--adapters 8] [--requests 256] [--clients 16] [--rounds 2]

The tiny test model (tests/tiny_model.py; `--base default`: the packaged default model) and
`--adapters` real PEFT adapters of it (random
non-zero weights); each adapter also merged into the base and saved as a model of its own. Two
fleets, one after the other, with the same KV cache memory in all: (a) `adapters`: one engine, the
base with every adapter (`max_loras` = all of them); (b) `merged`: one engine per merged model, each
with 1/N of the cache. The same mixed load on each: `--clients` clients, each request naming an
adapter (a) or its merged model (b) in one fixed random order, 32 tokens out; `--rounds` rounds per
fleet. Output tokens per second (counted from the answers' usage) and TTFT p50/p99; the JSON has
every number.

On a GPU (`--gpu`: every engine on GPU 0, the base's own dtype, 0.8 of the GPU shared out, the same
`--kv-gib` of KV cache either way) the machine may lack PEFT: make the adapters where PEFT is
(`--make-adapters DIR --base default --adapter-base /root/models/smollm2-135m-instruct`), carry
them, and pass `--adapters-from DIR`; the merged models are then made there without PEFT
(tests/tiny_model.merge_adapter, checked against PEFT's merge in tests/benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.procs import free_port, free_ports, stop_all
from bench.sleep import Fleet

KV_GIB = 0.4  # the whole fleet's KV cache, either way (CPU; --kv-gib on a GPU)
GPU_SHARE = 0.8  # of GPU 0, for the one engine or split among the merged ones


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> tuple[float, int]:
    """(seconds to the first token, completion tokens) of one streamed completion."""
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    began, first, used = time.monotonic(), None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            if first is None and '"text":"' in line and '"text":""' not in line:
                first = time.monotonic() - began
            if '"usage":{' in line:
                used = json.loads(line[6:])["usage"]["completion_tokens"]
    return first if first is not None else time.monotonic() - began, used


async def load(url: str, names: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    order = random.Random(7).choices(range(len(names)), k=ns.requests)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for k in order:
        queue.put_nowait(k)
    ttfts: list[float] = []
    tokens = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            k = queue.get_nowait()
            ttft, used = await one(client, url, names[k], ns.tokens)
            ttfts.append(ttft)
            tokens += used

    began = time.monotonic()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=ns.clients)) as client:
        await asyncio.gather(*(worker(client) for _ in range(ns.clients)))
    took = time.monotonic() - began
    ttfts.sort()
    return {"requests": len(ttfts), "seconds": took, "output_tokens": tokens, "output_tok_s": tokens / took,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))]}


def models_toml(ns: argparse.Namespace, base: Path, adapters: list[Path], merged: list[Path], mode: str) -> str:
    def where(engines: int) -> str:
        if ns.gpu:
            return f"gpus = [0]\ngpu_memory_utilization = {GPU_SHARE / engines:.4f}\nkv_cache_gib = {ns.kv_gib / engines:.4f}\n"
        return f'dtype = "float32"\nkv_cache_gib = {KV_GIB / engines:.4f}\n'

    if mode == "adapters":
        listed = ", ".join(f'"a{k}" = "{p}"' for k, p in enumerate(adapters))
        return (f'[[models]]\nname = "base"\nsource = "{base}"\nport = {free_port()}\nmax_model_len = 512\n{where(1)}'
                f"adapters = {{ {listed} }}\nmax_loras = {len(adapters)}\nmax_lora_rank = 8\n")
    first = free_ports(len(merged))
    return "".join(f'[[models]]\nname = "m{k}"\nsource = "{p}"\nport = {first + k}\nmax_model_len = 512\n'
                   f"{where(len(merged))}\n" for k, p in enumerate(merged))


def model_path(source: str, out: Path) -> Path:
    """The model's folder: "tiny" (the test model, made under `out`), or a fleet.toml source."""
    if source == "tiny":
        from tiny_model import write_tiny_model

        return write_tiny_model(out / "tiny")
    from fleet.sources import resolve

    return Path(resolve(source))


def make_adapters(ns: argparse.Namespace, base: Path, into: Path) -> list[Path]:
    """`--adapters` PEFT adapters of `base` under `into`; `--adapter-base` names the base in each
    (what fleet checks the adapter against) where it will be served from another folder."""
    from tiny_model import write_lora_adapter

    made = [write_lora_adapter(base, into / f"adapter{k}", seed=k + 1) for k in range(ns.adapters)]
    if ns.adapter_base:
        for a in made:
            config = json.loads((a / "adapter_config.json").read_text())
            (a / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": ns.adapter_base}, indent=2))
    return made


async def main_async(ns: argparse.Namespace) -> None:
    from tiny_model import merge_adapter, write_merged_model

    ns.out.mkdir(parents=True, exist_ok=True)
    base = model_path(ns.base, ns.out)
    if ns.adapters_from:
        adapters = [ns.adapters_from / f"adapter{k}" for k in range(ns.adapters)]
        merged = [merge_adapter(base, a, ns.out / f"merged{k}") for k, a in enumerate(adapters)]
    else:
        adapters = make_adapters(ns, base, ns.out)
        merged = [write_merged_model(base, a, ns.out / f"merged{k}") for k, a in enumerate(adapters)]
    result: dict[str, Any] = {"base": ns.base, "adapters": ns.adapters, "requests": ns.requests, "clients": ns.clients,
                              "tokens": ns.tokens, "gpu": ns.gpu, "kv_cache_gib_total": ns.kv_gib if ns.gpu else KV_GIB,
                              "rounds": []}
    try:
        for mode in ("adapters", "merged"):
            names = [f"a{k}" for k in range(ns.adapters)] if mode == "adapters" else [f"m{k}" for k in range(ns.adapters)]
            async with Fleet(ns.out, f"lora-{mode}", models_toml(ns, base, adapters, merged, mode)) as fleet:
                await load(fleet.url, names, argparse.Namespace(**{**vars(ns), "requests": len(names)}))  # warm-up
                for k in range(ns.rounds):
                    row = {"mode": mode, "round": k + 1, **await load(fleet.url, names, ns)}
                    result["rounds"].append(row)
                    print(json.dumps(row), flush=True)
    finally:
        stop_all()
        (ns.out / "lora.json").write_text(json.dumps(result, indent=2))
    by = {m: [r for r in result["rounds"] if r["mode"] == m] for m in ("adapters", "merged")}
    ratio = statistics.median(r["output_tok_s"] for r in by["adapters"]) / statistics.median(
        r["output_tok_s"] for r in by["merged"])
    print(f"adapters / merged, output tok/s: {ratio:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny", help='"tiny" (the test model, made here) or a source: "default", a folder')
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=256, help="requests per round")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lora"))
    ap.add_argument("--gpu", action="store_true", help="every engine on GPU 0 (default: the CPU, float32)")
    ap.add_argument("--kv-gib", type=float, default=4.0, help="--gpu: the whole fleet's KV cache, either way")
    ap.add_argument("--adapters-from", type=Path, help="adapter0.. made beforehand (--make-adapters), merged here without PEFT")
    ap.add_argument("--make-adapters", type=Path, metavar="DIR", help="only make the adapters, under DIR, and stop")
    ap.add_argument("--adapter-base", help="--make-adapters: the base's path as the serving machine names it")
    ns = ap.parse_args()
    if ns.make_adapters:
        ns.out.mkdir(parents=True, exist_ok=True)
        for a in make_adapters(ns, model_path(ns.base, ns.out), ns.make_adapters):
            print("made", a)
        return
    asyncio.run(main_async(ns))


if __name__ == "__main__":
    main()
