"""A request to a cold model: its time to first token against the engine's own start time.

    python bench/on_demand.py [--source default] [--starts 3] [--out /tmp/on-demand]

One fleet (`fleet launch`, the model with `start = "on_demand"`, `when_idle = "stop"`): each round
waits until the model is idle (no engine), sends one streamed completion and times its first token
(`cold`); the engine's own start is what the launcher reports ("ready in X s": from spawning the
engine to its first healthy answer); a second request right after, to the warm engine, gives the
first-token time of the same request without a start (`warm`). What fleet adds to a cold start is
`cold - start - warm`: the wait for the owner to notice the engine is up, and the waiting
request's way on to it. Rounds one after the other, on this machine; the JSON has every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.procs import Server, free_port, stop_all, wait_http

IDLE_AFTER = 1.0


async def first_token(client: httpx.AsyncClient, url: str) -> float:
    """Seconds from sending a streamed completion to its first token."""
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, "stream": True}
    began = time.monotonic()
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and '"text"' in line:
                return time.monotonic() - began
    raise RuntimeError("no token came")


async def state(client: httpx.AsyncClient, url: str) -> str:
    return str((await client.get(f"{url}/health")).json()["models"]["m"])


async def main_async(ns: argparse.Namespace) -> dict:
    ns.out.mkdir(parents=True, exist_ok=True)
    port, engine_port = free_port(), free_port()
    config = ns.out / "fleet.toml"
    config.write_text(f'[gateway]\nport = {port}\n\n[[models]]\nname = "m"\nsource = "{ns.source}"\nport = {engine_port}\n'
                      f'start = "on_demand"\nwhen_idle = "stop"\nidle_after = {IDLE_AFTER}\n')
    server = Server("fleet", [str(ROOT / ".venv/bin/fleet"), "launch", "--config", str(config), "--no-engine-logs"],
                    ns.out / "launcher.log")
    server.start()
    url = f"http://127.0.0.1:{port}"
    rounds: list[dict[str, float]] = []
    try:
        await wait_http(f"{url}/health", server, 60)
        async with httpx.AsyncClient(timeout=900) as client:
            for k in range(ns.starts):
                while await state(client, url) != "idle":  # the previous round's engine stops after IDLE_AFTER
                    await asyncio.sleep(0.1)
                cold = await first_token(client, url)
                warm = await first_token(client, url)
                starts = [float(s) for s in re.findall(r"fleet m: ready in ([\d.]+)s", server.log_path.read_text())]
                start = starts[-1]
                rounds.append({"cold_ttft_s": cold, "engine_start_s": start, "warm_ttft_s": warm,
                               "fleet_adds_s": cold - start - warm})
                print(f"start {k + 1}: first token {cold:.2f}s, engine ready in {start:.2f}s, warm first token "
                      f"{warm * 1000:.0f} ms: fleet adds {(cold - start - warm) * 1000:.0f} ms", flush=True)
    finally:
        server.stop()
        stop_all()
    adds = [r["fleet_adds_s"] for r in rounds]
    result = {"source": ns.source, "idle_after": IDLE_AFTER, "rounds": rounds,
              "fleet_adds_median_s": statistics.median(adds), "fleet_adds_max_s": max(adds)}
    (ns.out / "on_demand.json").write_text(json.dumps(result, indent=2))
    print(f"fleet adds to a cold start: median {result['fleet_adds_median_s'] * 1000:.0f} ms, "
          f"max {result['fleet_adds_max_s'] * 1000:.0f} ms", flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="default", help="the model (fleet.toml's source)")
    ap.add_argument("--starts", type=int, default=3, help="cold starts measured, one after the other")
    ap.add_argument("--out", type=Path, default=Path("/tmp/on-demand"))
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
