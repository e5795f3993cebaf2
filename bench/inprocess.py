"""The gateway's CPU per request, without HTTP in front of it: ASGI calls straight into the app.

    .venv/bin/python bench/inprocess.py                 # 5000 non-streamed completions
    .venv/bin/python bench/inprocess.py --stream        # the streamed form
    .venv/bin/python bench/inprocess.py --profile       # and cProfile's top functions

A real launcher runs one model on bench/null_engine.py (a separate process, over fleet's real
engine client); the requests go one at a time into the same app `fleet launch` serves, on uvloop.
What it prints is the CPU time of this process per request: Litestar, fleet's planning, engine
exchange, shaping and bookkeeping, but not uvicorn's HTTP parsing or the client's side of the
socket (what `bench/run.py` measures on the wire). Use it to compare two versions of the code
side by side; on a shared or slow machine, interleave several runs of each.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.null_engine import null_command
from bench.procs import free_port
from bench.referee import TOOL_CHOICES, WEATHER
from fleet.cli import run_loop
from fleet.config.load import parse_config
from fleet.gateway.app import create_app
from fleet.lifecycle import EngineState
from fleet.run.launcher import Fleet


def _scope(body: bytes, path: str = "/v1/completions") -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {},
    }


async def _call(app: Any, body: bytes, path: str = "/v1/completions") -> int:
    """One request through the ASGI app; its status."""
    sent = False
    answered = asyncio.Event()
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # as uvicorn: "disconnected" only once the response is complete
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            answered.set()

    await app(_scope(body, path), receive, send)
    return status


async def measure(requests: int, stream: bool, profile: bool, max_tokens: int = 16, tools: bool = False) -> dict[str, float]:
    """Run the fleet, warm up, then time `requests` calls; CPU and wall microseconds per request."""
    engine_port = free_port()
    cfg = parse_config({"gateway": {"host": "127.0.0.1", "port": free_port()},
                        "models": [{"name": "m", "source": "default", "port": engine_port}]})
    fleet = Fleet(cfg, command=null_command, echo_logs=False)
    runner = asyncio.create_task(fleet.run())
    try:
        await fleet.gateway_started.wait()
        deadline = time.monotonic() + 60
        while fleet.models["m"].state is not EngineState.READY:
            if time.monotonic() > deadline:
                raise RuntimeError("the null engine did not become ready in 60 s")
            await asyncio.sleep(0.05)
        # as `fleet launch` builds it: with its control, so with the status page's request log
        app = create_app(fleet.models, control=fleet, keys=fleet.keys, gateway=cfg.gateway, ui=cfg.ui)
        body = (b'{"model":"m","prompt":"hello there","max_tokens":%d,"temperature":0%s}'
                % (max_tokens, b',"stream":true' if stream else b""))
        path = "/v1/completions"
        if tools:  # an agent's call: chat with a named tool, the same tool every time
            path = "/v1/chat/completions"
            body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "The weather in Paris?"}],
                               "tools": [WEATHER], "tool_choice": TOOL_CHOICES["named"], "max_tokens": max_tokens,
                               "temperature": 0, "stream": stream}).encode()
        for _ in range(min(1000, requests)):
            if (status := await _call(app, body, path)) != 200:
                raise RuntimeError(f"warm-up request answered {status}")
        profiler = cProfile.Profile() if profile else None
        if profiler:
            profiler.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(requests):
            await _call(app, body, path)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return {"cpu_us": cpu / requests * 1e6, "wall_us": wall / requests * 1e6, "engine_port": engine_port}
    finally:
        fleet.stop()
        await runner


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="inprocess.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--stream", action="store_true", help="stream: true (16 SSE events per request)")
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions (slows every call)")
    p.add_argument("--tools", action="store_true", help="chat completions calling a named tool (bench/referee.py's)")
    ns = p.parse_args(argv)
    result: dict[str, float] = {}

    async def run() -> None:
        result.update(await measure(ns.requests, ns.stream, ns.profile, tools=ns.tools))

    run_loop(run())
    print(f"null engine: port {result['engine_port']:.0f}")
    print(f"gateway in-process: {result['cpu_us']:.0f} us CPU per request, {result['wall_us']:.0f} us wall "
          f"(one at a time, null engine round trip included; {ns.requests} requests)")


if __name__ == "__main__":
    main()
