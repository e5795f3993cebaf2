"""The hop between the gateway and an engine on its machine: CPU per request on each side of it,
over loopback TCP, over HTTP on the engine's Unix socket (`unix`), or over the gateway's one
connection there (`mux`, fleet.wire.mux: what fleet uses for an engine it started).

    .venv/bin/python bench/hop.py [--via tcp,unix,mux] [--rounds 4] [--requests 2000] [--concurrency 1,16]

The engine side is fleet's real engine server (fleet/engine/server.py: uvicorn, its /generate
route) in a process of its own, over a service that yields one frame per step (as bench/
engine_route.py's, 64 frames per request, one loop turn apart: one vLLM step each); the
gateway side is fleet's real engine client (fleet/wire/client.py) in this process, reading every
frame. No vLLM, no model: what is measured is the hop itself (uvicorn's writes, the sockets,
the client's reads and frame decoding). Each round measures every way in turn, the order reversed
each round; the JSON line at the end has every round's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil

from bench.engine_route import FRAMES
from bench.procs import free_port
from fleet.wire import protocol
from fleet.wire.client import EngineClient

ENGINE = """
import asyncio, sys, uvicorn, uvloop
sys.path.insert(0, {root!r})
from bench.engine_route import FRAMES, Service
from fleet.engine.server import create_engine_app, mux_routes
from fleet.run.process import SignalFreeServer
from fleet.wire import protocol
from fleet.wire.mux import EngineSide

DONE = protocol.encode_frame(protocol.Done(prompt_tokens=1, completion_tokens=FRAMES))

class Ended(Service):  # bench/engine_route.py's engine, its answers ended by Done as a real engine's
    async def frames(self, req):
        async for frame in super().frames(req):
            yield frame
        yield DONE

service = Ended()
BUSY = {busy_us} / 1e6


async def busy() -> None:  # a loaded engine loop: every turn also runs this long (vLLM's output handling)
    import time
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < BUSY:
            pass
        await asyncio.sleep(0)

routes = mux_routes(service)
server = SignalFreeServer(uvicorn.Config(create_engine_app(service), host="127.0.0.1", port={port},
                                         log_level="warning", access_log=False), unix_socket={unix!r},
                          mux=lambda: EngineSide(routes, None, 1 << 20))


async def main():
    if BUSY:
        keep = asyncio.ensure_future(busy())  # noqa: F841
    await server.serve()

uvloop.run(main())
"""


def start_engine(port: int, unix: str, busy_us: float = 0.0) -> subprocess.Popen[bytes]:
    code = ENGINE.format(root=str(ROOT), port=port, unix=unix, busy_us=busy_us)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)


async def measure(client: EngineClient, engine: psutil.Process, requests: int, concurrency: int) -> dict[str, float]:
    """CPU per request of this process (the client) and of the engine, `requests` at `concurrency`."""
    req = protocol.GenerateRequest(request_id="r", prompt="x", sampling=protocol.SamplingParams(max_tokens=1))
    left = requests
    firsts: list[float] = []

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            began, first = time.perf_counter(), True
            async for batch in client.generate(req):
                if first:
                    firsts.append(time.perf_counter() - began)
                    first = False
                if isinstance(batch[-1], protocol.Error):
                    raise RuntimeError(batch[-1].message)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, 64))))  # warm: connections open
    left = requests
    firsts.clear()
    e0, c0, w0 = engine.cpu_times(), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    e1, c1, w1 = engine.cpu_times(), time.process_time(), time.perf_counter()
    return {"client_us": (c1 - c0) / requests * 1e6,
            "engine_us": ((e1.user + e1.system) - (e0.user + e0.system)) / requests * 1e6,
            "wall_us": (w1 - w0) / requests * 1e6, "first_us": statistics.median(firsts) * 1e6}


async def main(ns: argparse.Namespace) -> None:
    ways = ns.via.split(",")
    concurrencies = [int(c) for c in ns.concurrency.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hop-") as tmp:
        port, unix = free_port(), os.path.join(tmp, "engine.sock")
        proc = start_engine(port, unix, ns.busy_us)
        try:
            deadline = time.monotonic() + 30
            while not os.path.exists(unix):  # noqa: ASYNC240 - start-up, before any load; it listens on both once the socket file is there
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the engine server did not start")
                await asyncio.sleep(0.05)
            engine = psutil.Process(proc.pid)
            clients = {"tcp": EngineClient("m", "127.0.0.1", port),
                       "unix": EngineClient("m", "127.0.0.1", port, unix=unix, one_connection=False),
                       "mux": EngineClient("m", "127.0.0.1", port, unix=unix)}
            for k in range(ns.rounds):
                for c in concurrencies:
                    for way in (ways if k % 2 == 0 else ways[::-1]):
                        row = {"round": k + 1, "via": way, "concurrency": c,
                               **await measure(clients[way], engine, ns.requests, c)}
                        rows.append(row)
                        print(f"round {k + 1} c={c} {way:>4}: client {row['client_us']:.0f} us, engine "
                              f"{row['engine_us']:.0f} us, wall {row['wall_us']:.0f} us per {FRAMES}-frame request, "
                              f"first frame {row['first_us']:.0f} us (p50)",
                              flush=True)
            for client in clients.values():
                await client.close()
        finally:
            proc.terminate()
            proc.wait(10)
    print("\nmedians over rounds (us per request):")
    for c in concurrencies:
        for way in ways:
            mine = [r for r in rows if r["via"] == way and r["concurrency"] == c]
            print(f"  c={c} {way:>4}: client {statistics.median(r['client_us'] for r in mine):.0f}, engine "
                  f"{statistics.median(r['engine_us'] for r in mine):.0f}, wall {statistics.median(r['wall_us'] for r in mine):.0f}, "
                  f"first frame {statistics.median(r['first_us'] for r in mine):.0f}")
    print(json.dumps({"frames": FRAMES, "requests": ns.requests, "busy_us": ns.busy_us, "rows": rows}))


if __name__ == "__main__":
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--via", default="tcp,unix")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--busy-us", type=float, default=0.0,
                    help="the engine loop also spends this long every turn, as vLLM's output handling does")
    uvloop.run(main(ap.parse_args()))
