"""The HTTP stack's own floor: what uvicorn and Litestar cost before fleet does anything.

    .venv/bin/python bench/floor.py [--rate 500] [--requests 4000] [--runs 2]

Instant OpenAI-shaped servers answer the same /v1/completions load (open loop, fixed rate,
bench/loadgen.py), each parsing the body into fleet's CompletionRequest and answering a fixed
completion: `bench/stub_openai.py` (a raw asyncio server, bench/tinyhttp.py), then under uvicorn
(httptools, uvloop) a bare ASGI callable, a Litestar ASGI route (what fleet's generation routes
are) and a typed Litestar route (`data: JSONBody[...]`, what they were). The differences are the
floor under fleet's "added latency": fleet's gateway is the Litestar ASGI route plus a second HTTP
exchange (the engine) plus its own work. Loopback only; every server is stopped at the end.
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

STACKS = {  # --serve KIND: what runs under uvicorn
    "asgi": "uvicorn, bare ASGI app",
    "litestar-asgi": "uvicorn + Litestar ASGI route",
    "litestar-typed": "uvicorn + Litestar typed route",
}


def serve(kind: str, port: int) -> None:
    """One instant server under uvicorn: the same body parsing and answer, in the stack `kind`."""
    import uvicorn
    from litestar import Litestar, Response, asgi, post
    from litestar.params import JSONBody
    from litestar.types import ASGIApp, Receive, Scope, Send

    from bench.stub_openai import answer
    from fleet.api.completions.protocol import CompletionRequest
    from fleet.gateway.bodies import decode_body, decoder
    from fleet.wire.asgi import read_body

    body_of = decoder(CompletionRequest)  # fleet's own body reading and decoding

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 405, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        data = decode_body(await read_body(scope, receive, 1 << 20), body_of)
        body, content_type = answer(False, data.max_tokens or 16, False, False, data.model)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    @post("/v1/completions", status_code=200)
    async def typed(data: JSONBody[CompletionRequest]) -> Response[bytes]:
        body, content_type = answer(False, data.max_tokens or 16, False, False, data.model)
        return Response(body, media_type=content_type)

    names = {"CompletionRequest": CompletionRequest, "JSONBody": JSONBody, "Response": Response, "Scope": Scope,
             "Receive": Receive, "Send": Send}
    handlers = {"litestar-asgi": asgi("/v1/completions", is_mount=False, copy_scope=False)(bare), "litestar-typed": typed}
    app: ASGIApp = bare if kind == "asgi" else Litestar(
        [handlers[kind]], logging_config=None, openapi_config=None, signature_namespace=names)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, ws="none",
                loop="uvloop", http="httptools", lifespan="off" if kind == "asgi" else "auto")


async def measure(rate: float, requests: int, runs: int, workdir: Path) -> None:
    """Start every server, warm them up, then alternate open-loop runs between them."""
    raw_port = free_port()
    servers = {"raw asyncio (stub_openai.py)": (
        Server("stub", [sys.executable, str(ROOT / "bench" / "stub_openai.py"), "--port", str(raw_port)],
               workdir / "stub.log"), raw_port, "/health")}
    for kind, name in STACKS.items():
        port = free_port()
        servers[name] = (Server(kind, [sys.executable, __file__, "--serve", kind, str(port)], workdir / f"{kind}.log"),
                         port, "/v1/completions")
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
        raw, bare, lasgi, typed = (sorted(v)[len(v) // 2] for v in p50.values())
        print(f"median p50: raw {raw:.3f} ms, uvicorn alone {bare:.3f}, Litestar ASGI route {lasgi:.3f}, "
              f"Litestar typed route {typed:.3f}: uvicorn adds {bare - raw:.3f} ms, an ASGI route {lasgi - bare:.3f} ms "
              f"more, a typed one {typed - bare:.3f} ms more")
    finally:
        for server, _, _ in servers.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="floor.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "floor")
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)  # internal: one server
    ns = parser.parse_args()
    if ns.serve:
        serve(ns.serve[0], int(ns.serve[1]))
        return
    ns.workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(measure(ns.rate, ns.requests, ns.runs, ns.workdir))


if __name__ == "__main__":
    main()
