"""Models put away and brought back (issue 33), on a GPU: a wake from vLLM's sleep mode against a
cold start, and two models taking turns on one GPU against the two side by side.

    python bench/sleep.py --source /root/models/smollm2-135m-instruct --out /tmp/sleep
    python bench/sleep.py --cpu --source TINY_MODEL_DIR --out /tmp/sleep   # a dry run: no sleep mode on the CPU

`wake`: one fleet per way a model is put away: stopped, asleep at level 1, asleep at level 2 (the
CPU: stopped only). The model (`m`, started on demand) on GPU 0 with 0.45 of its memory. Each round
puts it away (`POST /fleet/models/m/sleep`, what `fleet sleep m` does), reads the GPU memory in use,
then times the first token of a streamed completion that finds it away (`away_ttft_s`: its start or
wake and the answer), and of a second one (`warm_ttft_s`). The launcher's own lines give the
engine's part: "ready in X s" (a start), "awake in X s" (a wake).

`turns`: two models, `--every` requests to one then to the other, `--switches` times, from
`--clients` concurrent clients: (a) `set`: a [[sets]] entry holding one at a time, each model with
0.9 of the GPU (asleep at level 1 while the other serves; the CPU: stopped); (b) `shares`: the same
two always awake, 0.45 each. Requests per second and TTFT p50/p99 of each.

One JSON (`sleep.json`) with every number, and the launchers' logs, under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import Server, free_port, stop_all, wait_http

PROMPT = "The capital of France is"


def gpu_memory_mib() -> int | None:
    """GPU 0's memory in use (nvidia-smi), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return int(out) if out.isdigit() else None


def model_table(name: str, ns: argparse.Namespace, port: int, share: float, **fields: Any) -> str:
    lines = [f'[[models]]\nname = "{name}"\nsource = "{ns.source}"\nport = {port}\nmax_model_len = 512']
    if not ns.cpu:
        lines.append(f"gpus = [0]\ngpu_memory_utilization = {share}")
    else:
        lines.append('dtype = "float32"\nkv_cache_gib = 0.1')
    lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


class Fleet:
    """`fleet launch` on a generated fleet.toml; stopped on leaving."""

    def __init__(self, out: Path, name: str, tables: str, supervisor: str = "") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = out / f"{name}.toml"
        config.write_text(f"[gateway]\nport = {self.port}\n\n[supervisor]\ndrain_timeout = 30\n{supervisor}\n{tables}")
        self.server = Server(name, [sys.executable, "-m", "fleet.cli", "launch", "--config", str(config),
                                    "--no-engine-logs"], out / f"{name}.log")

    async def __aenter__(self) -> Fleet:
        self.server.start()
        await wait_http(f"{self.url}/health", self.server, 120)
        async with httpx.AsyncClient(timeout=10) as client:  # engines started at launch: ready first
            while any(s not in ("ready", "idle") for s in (await client.get(f"{self.url}/health")).json()["models"].values()):
                if not self.server.alive():
                    raise RuntimeError(f"the fleet exited:\n{self.server.tail()}")
                await asyncio.sleep(0.5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.stop()

    def seconds(self, pattern: str) -> list[float]:
        return [float(s) for s in re.findall(pattern, self.server.log_path.read_text())]


async def first_token(client: httpx.AsyncClient, url: str, model: str, tokens: int = 4) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    began = time.monotonic()
    first = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: ") and '"text"' in line:
                first = time.monotonic() - began
    if first is None:
        raise RuntimeError("no token came")
    return first


async def wake(ns: argparse.Namespace) -> list[dict[str, Any]]:
    ways: list[tuple[str, dict[str, Any]]] = [("stopped", {"when_idle": "stop", "idle_after": 86400})]
    if not ns.cpu:
        ways += [(f"level{k}", {"when_idle": "sleep", "idle_after": 86400, "sleep_level": k}) for k in (1, 2)]
    rows = []
    for way, fields in ways:
        tables = model_table("m", ns, free_port(), 0.45, start="on_demand", **fields)
        async with Fleet(ns.out, f"wake-{way}", tables) as fleet, httpx.AsyncClient(timeout=900) as client:
            await first_token(client, fleet.url, "m")  # the first start (compile caches filled)
            for k in range(ns.rounds):
                r = await client.post(f"{fleet.url}/fleet/models/m/sleep", timeout=900)
                r.raise_for_status()
                away_mib = gpu_memory_mib()
                away = await first_token(client, fleet.url, "m")
                warm = await first_token(client, fleet.url, "m")
                engine = fleet.seconds(r"fleet m: (?:ready|awake) in ([\d.]+)s")[-1]
                row = {"way": way, "round": k + 1, "state_away": r.json()["state"], "away_ttft_s": away,
                       "engine_s": engine, "warm_ttft_s": warm, "gpu_mib_away": away_mib, "gpu_mib_awake": gpu_memory_mib()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


async def turns(ns: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    away = {"when_idle": "stop", "idle_after": 86400} if ns.cpu else {}
    for mode in ("set", "shares"):
        share = 0.9 if mode == "set" else 0.45
        tables = "".join(model_table(n, ns, free_port(), share, **(away if mode == "set" else {})) for n in ("a", "b"))
        if mode == "set":
            tables = '[[sets]]\nname = "gpu0"\nmodels = ["a", "b"]\nmin_awake = 0\n\n' + tables
        async with Fleet(ns.out, f"turns-{mode}", tables) as fleet, httpx.AsyncClient(timeout=900) as client:
            for name in ("a", "b"):  # both started once (compile caches), then the clock starts
                await first_token(client, fleet.url, name)
            ttfts: list[float] = []
            began = time.monotonic()
            for k in range(ns.switches):
                model = "ab"[k % 2]
                for _ in range(ns.every // ns.clients):
                    ttfts += await asyncio.gather(*(first_token(client, fleet.url, model, ns.tokens)
                                                    for _ in range(ns.clients)))
            took = time.monotonic() - began
            ttfts.sort()
            row = {"mode": mode, "requests": len(ttfts), "seconds": took, "requests_per_s": len(ttfts) / took,
                   "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))],
                   "wakes": len(fleet.seconds(r"awake in ([\d.]+)s")), "starts": len(fleet.seconds(r"ready in ([\d.]+)s"))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


async def main_async(ns: argparse.Namespace) -> None:
    ns.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"source": ns.source, "cpu": ns.cpu, "every": ns.every, "switches": ns.switches,
                              "clients": ns.clients, "tokens": ns.tokens}
    try:
        if "wake" in ns.parts:
            result["wake"] = await wake(ns)
        if "turns" in ns.parts:
            result["turns"] = await turns(ns)
    finally:
        stop_all()
        (ns.out / "sleep.json").write_text(json.dumps(result, indent=2))
    for way in sorted({r["way"] for r in result.get("wake", [])}):
        rows = [r for r in result["wake"] if r["way"] == way]
        print(f"{way}: first token {statistics.median(r['away_ttft_s'] for r in rows):.2f}s (median of {len(rows)}), "
              f"engine {statistics.median(r['engine_s'] for r in rows):.2f}s, warm "
              f"{statistics.median(r['warm_ttft_s'] for r in rows) * 1000:.0f} ms", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default", help="the model (fleet.toml's source)")
    ap.add_argument("--cpu", action="store_true", help="a dry run on the CPU: stopped, never asleep")
    ap.add_argument("--parts", nargs="+", default=["wake", "turns"], choices=["wake", "turns"])
    ap.add_argument("--rounds", type=int, default=3, help="wake: rounds per way")
    ap.add_argument("--every", type=int, default=16, help="turns: requests to one model before the other's")
    ap.add_argument("--switches", type=int, default=8, help="turns: how many times the models take turns")
    ap.add_argument("--clients", type=int, default=4, help="turns: requests at once")
    ap.add_argument("--tokens", type=int, default=64, help="turns: tokens per answer")
    ap.add_argument("--out", type=Path, default=Path("/tmp/sleep"))
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
