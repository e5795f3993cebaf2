"""Replicas dying under load (issue 37): what an engine's death costs the clients.

    python bench/deaths.py --minutes 10 --kill-every 90 --out /tmp/deaths
    python bench/deaths.py --source default --minutes 5 --kill-every 60
    python3 bench/deaths.py --source /root/models/smollm2-135m-instruct --gpus 0,1 --clients 64 --minutes 4 --kill-every 60

Two replicas of a model (the tiny test model made here, or `--source`) on real vLLM engines,
`fleet launch` in its own process; `--clients` clients send greedy completions of `--tokens`
tokens without pause, half of them streamed. Every `--kill-every` seconds, once both replicas
serve, one replica's engine (the replicas in turn) is killed with SIGKILL. Counted: answers by
outcome (a failure is anything but a whole answer with the asked number of tokens), failed
requests per kill, and for each stream in flight at a kill, the time from the kill to its next
token (a stream on the dead replica waits for the takeover; one on the other does not); the
gateway's own counts of requests run again, resumed and given up (/fleet/status); the launcher's
RSS over the run (the gateway lives in it). One JSON under --out, a summary on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench.lora import model_path
from bench.procs import free_ports, stop_all
from bench.sleep import Fleet

PROMPTS = [f"The capital of {c} is" for c in ("France", "Germany", "Italy", "Spain", "Peru", "Chad", "Iran", "Fiji")]


async def status(client: httpx.AsyncClient, url: str) -> dict[str, dict[str, Any]]:
    return {r["replica"]: r for r in (await client.get(f"{url}/fleet/status")).json()["models"]}


async def one(client: httpx.AsyncClient, url: str, prompt: str, tokens: int, stream: bool) -> dict[str, Any]:
    """One request: its outcome, and a stream's token arrival times."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    began, arrivals = time.monotonic(), []
    try:
        if not stream:
            r = await client.post(f"{url}/v1/completions", json=body)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens
            return {"began": began, "stream": False, "ok": ok, "status": r.status_code}
        used = 0
        async with client.stream("POST", f"{url}/v1/completions",
                                 json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
            async for line in r.aiter_lines():
                if line.startswith('data: {"error"'):
                    return {"began": began, "stream": True, "ok": False, "status": line[6:200]}
                if line.startswith("data: {"):
                    if '"text":"' in line:
                        arrivals.append(time.monotonic())
                    if '"usage":{' in line:
                        used = json.loads(line[6:])["usage"]["completion_tokens"]
        return {"began": began, "stream": True, "ok": r.status_code == 200 and used == tokens, "status": r.status_code,
                "arrivals": arrivals}
    except httpx.HTTPError as e:
        return {"began": began, "stream": stream, "ok": False, "status": type(e).__name__}


async def run(ns: argparse.Namespace) -> dict[str, Any]:
    source = model_path(ns.source, ns.out)
    if ns.gpus:  # one replica per GPU, vLLM's own settings there (bf16, CUDA graphs)
        ports = free_ports(2)
        places = ", ".join(f"{{ gpus = [{g}], port = {ports + k} }}" for k, g in enumerate(ns.gpus.split(",")))
        tables = (f'[[models]]\nname = "m"\nsource = "{source}"\nplacements = [{places}]\n'
                  f"max_model_len = 2048\ngpu_memory_utilization = {ns.memory}\n")
    else:
        tables = (f'[[models]]\nname = "m"\nsource = "{source}"\n'
                  f'port = {free_ports(2)}\nreplicas = 2\ndtype = "float32"\nmax_model_len = 512\nkv_cache_gib = 0.1\n')
    results: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    rss: list[tuple[float, float]] = []
    async with Fleet(ns.out, "deaths", tables, "restart_backoff = 0.5\nmax_restarts = 1000\n") as fleet, httpx.AsyncClient(timeout=300, limits=httpx.Limits(
            max_connections=ns.clients + 4)) as client:
        launcher = psutil.Process(fleet.server.pid)
        began = time.monotonic()
        end = began + ns.minutes * 60
        before = next(iter((await status(client, fleet.url)).values()))["taken_over"]

        async def worker(i: int) -> None:
            k = 0
            while time.monotonic() < end:
                results.append(await one(client, fleet.url, PROMPTS[(i + k) % len(PROMPTS)], ns.tokens, i % 2 == 0))
                k += 1

        async def killer() -> None:
            turn = 0
            while time.monotonic() + ns.kill_every < end:
                await asyncio.sleep(ns.kill_every)
                rows = await status(client, fleet.url)
                while not all(r["state"] == "ready" and r["pid"] for r in rows.values()):
                    await asyncio.sleep(0.5)  # never both down: the other replica takes over
                    rows = await status(client, fleet.url)
                victim = f"m.{turn % 2}"
                turn += 1
                kill = {"at": time.monotonic(), "replica": victim}
                kills.append(kill)
                os.kill(rows[victim]["pid"], signal.SIGKILL)
                # until the launcher has it serving again (its restart: a new engine process, ready)
                while True:
                    row = (await status(client, fleet.url))[victim]
                    if row["state"] == "ready" and row["pid"] not in (None, rows[victim]["pid"]):
                        break
                    await asyncio.sleep(0.2)
                kill["serving_again_s"] = round(time.monotonic() - kill["at"], 2)

        async def sampler() -> None:
            while time.monotonic() < end:
                rss.append((time.monotonic() - began, launcher.memory_info().rss / 2**20))
                await asyncio.sleep(5)

        await asyncio.gather(*(worker(i) for i in range(ns.clients)), killer(), sampler())
        after = next(iter((await status(client, fleet.url)).values()))["taken_over"]
    stop_all()
    failed = [r for r in results if not r["ok"]]
    waits = []
    for k in kills:  # each stream in flight at the kill: the kill to its next token
        for r in results:
            times = r.get("arrivals") or []
            if times and times[0] < k["at"] < times[-1]:
                waits.append(next(t for t in times if t > k["at"]) - k["at"])
    waits.sort()
    # a request begun after a kill, before the replica served again: the fleet knew of the death (or
    # learnt of it on that request) and must still answer it whole
    after_kill = [r for r in results if any(k["at"] <= r["began"] < k["at"] + k.get("serving_again_s", 1e9) for k in kills)]
    return {
        "source": ns.source, "minutes": ns.minutes, "kill_every_s": ns.kill_every, "clients": ns.clients,
        "tokens": ns.tokens, "answers": len(results), "ok": len(results) - len(failed), "failed": len(failed),
        "failed_kinds": sorted({str(r["status"]) for r in failed})[:10], "kills": len(kills),
        "failed_per_kill": len(failed) / len(kills) if kills else 0.0,
        "begun_while_a_replica_was_down": len(after_kill),
        "failed_of_those": sum(not r["ok"] for r in after_kill),
        "serving_again_s": [k.get("serving_again_s") for k in kills],
        "taken_over": {k: after[k] - before[k] for k in after},
        "streams_in_flight_at_kills": len(waits),
        "kill_to_next_token_s": {"p50": statistics.median(waits) if waits else None,
                                 "max": waits[-1] if waits else None,
                                 "slowest_per_kill": sorted(waits)[-len(kills):] if kills else []},
        "launcher_rss_mib": {"first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                             "max": max(m for _, m in rss) if rss else None},
        "rss_samples": rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="tiny", help='"tiny" (the test model, made here) or a source: "default", a folder')
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=90.0, help="seconds between two kills")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--gpus", default="", help="GPUs, one replica on each (e.g. 0,1); none: the CPU build's settings")
    ap.add_argument("--memory", type=float, default=0.4, help="with --gpus: gpu_memory_utilization of each engine")
    ap.add_argument("--out", type=Path, default=Path("/tmp/deaths"))
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(ns))
    (ns.out / "deaths.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples"}, indent=2))


if __name__ == "__main__":
    main()
