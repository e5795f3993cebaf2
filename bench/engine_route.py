"""CPU per request of the engine's /generate route alone: ASGI calls straight into the engine app
(fleet/engine/server.py) over a service that yields 64 frames at once, no vLLM and no sockets.

    .venv/bin/python bench/engine_route.py [--requests 3000]

Compare two checkouts by running it with each on PYTHONPATH, interleaved (the numbers of one
machine move between runs; pairs tell).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet.engine.server import create_engine_app
from fleet.wire import protocol

FRAME = protocol.encode_frame(protocol.Delta(index=0, text="tok", token_ids=[1]))
FRAMES = 64


class Service:
    healthy = True
    info = protocol.EngineInfo("m", 16, 10, 0, "x", "cpu")

    async def frames(self, req: protocol.GenerateRequest) -> Any:
        for _ in range(FRAMES):
            yield FRAME
            await asyncio.sleep(0)  # one engine step each, as the real service yields per step

    embed = tokenize = detokenize = frames  # the engine's other frame routes: not measured here


async def one(app: Any, body: bytes) -> None:
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", b"Bearer t"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    done, sent, bodies = asyncio.Event(), [False], [0]

    async def receive() -> dict[str, Any]:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            bodies[0] += 1
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    assert bodies[0] == FRAMES + 1, bodies[0]


async def main(requests: int) -> None:
    app = create_engine_app(Service(), token="t")  # type: ignore[arg-type]
    body = protocol.encode(protocol.GenerateRequest(request_id="r", prompt="x"))
    for _ in range(200):
        await one(app, body)
    start = time.process_time()
    for _ in range(requests):
        await one(app, body)
    print(f"{(time.process_time() - start) / requests * 1e6:.0f} us CPU per {FRAMES}-frame request")


if __name__ == "__main__":
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    uvloop.run(main(ap.parse_args().requests))
