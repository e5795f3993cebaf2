"""The HTTP stack's own floor: what uvicorn + Litestar cost before fleet does anything.

    .venv/bin/python bench/floor.py [--rate 500] [--requests 4000] [--runs 2]

Two instant OpenAI-shaped servers answer the same /v1/completions load (open loop, fixed rate,
bench/loadgen.py): `bench/stub_openai.py` (a raw asyncio server, bench/tinyhttp.py) and a bare
Litestar route under uvicorn (httptools, uvloop, a typed msgspec body as fleet's routes have, a
fixed answer; no engine behind it). The difference is the floor under fleet's "added latency":
fleet's gateway is this stack plus a second HTTP exchange (the engine) plus its own work.
Loopback only; both servers are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import loadgen
from bench.procs import Server, free_port, wait_http


def serve_bare_litestar(port: int) -> None:
    """The bare route: parse the body into fleet's CompletionRequest, answer a fixed completion."""
    import uvicorn
    from litestar import Litestar, Response, post
    from litestar.params import JSONBody

    from bench.stub_openai import answer
    from fleet.schemas import CompletionRequest

    @post("/v1/completions", status_code=200)
    async def completions(data: JSONBody[CompletionRequest]) -> Response[bytes]:
        body, content_type = answer(False, data.max_tokens or 16, False, False, data.model)
        return Response(body, media_type=content_type)

    app = Litestar([completions], logging_config=None, openapi_config=None,
                   signature_namespace={"CompletionRequest": CompletionRequest, "JSONBody": JSONBody, "Response": Response})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, ws="none",
                loop="uvloop", http="httptools")


async def measure(rate: float, requests: int, runs: int, workdir: Path) -> None:
    """Start both servers, warm them up, then alternate open-loop runs between them."""
    raw_port, bare_port = free_port(), free_port()
    servers = {
        "raw asyncio (stub_openai.py)": (Server("stub", [sys.executable, str(ROOT / "bench" / "stub_openai.py"), "--port",
                                                         str(raw_port)], workdir / "stub.log"), raw_port, "/health"),
        "uvicorn + Litestar route": (Server("bare", [sys.executable, __file__, "--serve", str(bare_port)],
                                            workdir / "bare.log"), bare_port, "/v1/completions"),
    }
    try:
        for server, port, path in servers.values():
            server.start()
            await wait_http(f"http://127.0.0.1:{port}{path}", server, 30, ok=405 if path == "/v1/completions" else 200)
        targets = {name: loadgen.completion_target(f"http://127.0.0.1:{port}", "m", ["hello there"], 16, stream=False)
                   for name, (_, port, _) in servers.items()}
        for target in targets.values():
            await loadgen.open_loop(target, min(rate, 200), 400)  # warm-up
        p50: dict[str, list[float]] = {name: [] for name in targets}
        for run in range(runs):
            for name, target in targets.items():
                s = loadgen.summarize(await loadgen.open_loop(target, rate, requests))
                lat = s["latency_ms"] or {}
                p50[name].append(lat.get("p50", float("nan")))
                print(f"run {run + 1} {name} @ {rate:g} req/s: p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms, "
                      f"errors {s['errors']}", flush=True)
        raw, bare = (sorted(v)[len(v) // 2] for v in p50.values())
        print(f"median p50: raw {raw:.3f} ms, uvicorn + Litestar {bare:.3f} ms: the stack adds {bare - raw:.3f} ms")
    finally:
        for server, _, _ in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="floor.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "floor")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the bare route on this port
    ns = parser.parse_args()
    if ns.serve:
        serve_bare_litestar(ns.serve)
        return
    ns.workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(measure(ns.rate, ns.requests, ns.runs, ns.workdir))


if __name__ == "__main__":
    main()
