"""The engine process: one vLLM AsyncLLM in-process, serving fleet's internal protocol.

Started by the launcher as ``python -m fleet.engine --model-json '<ModelConfig JSON>'``.
It resolves the model's source (converting a GGUF once), builds the engine (args.py), then
serves ``/health``, ``/info`` and ``/generate`` (fleet/wire/protocol.py) on the model's port.
When the gateway drops a /generate connection, the stream is cancelled and vLLM aborts the request.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import NotAuthorizedException
from litestar.response import Stream

from fleet.config.schema import ModelConfig
from fleet.engine.args import build_engine
from fleet.engine.service import EngineService
from fleet.run.process import SignalFreeServer, die_with_parent, reap_children
from fleet.wire import protocol

_request_decoder = protocol.decoder(protocol.GenerateRequest)


def create_engine_app(service: EngineService, token: str | None = None) -> Litestar:
    """The internal-protocol HTTP app around one engine; with a token, /info and /generate need it."""
    info_body = protocol.encode(service.info)
    expected = f"Bearer {token}".encode() if token else None

    async def require_token(request: Request[Any, Any, Any]) -> None:
        """A before_request hook (a plain-function guard would cost a thread hop per request)."""
        if expected is None:
            return
        presented = (request.headers.get("authorization") or "").encode()
        if not hmac.compare_digest(presented, expected):
            raise NotAuthorizedException("this engine answers only its fleet's gateway")

    @get("/health", sync_to_thread=False)
    def health() -> Response[bytes]:
        return Response(b"ok" if service.healthy else b"engine dead", status_code=200 if service.healthy else 503)

    @get("/info", sync_to_thread=False, before_request=require_token)
    def info() -> Response[bytes]:
        return Response(info_body, media_type="application/msgpack")

    @post("/generate", status_code=200, before_request=require_token)
    async def generate(request: Request[Any, Any, Any]) -> Stream:
        req = _request_decoder.decode(await request.body())
        return Stream(service.frames(req), media_type=protocol.CONTENT_TYPE)

    return Litestar([health, info, generate], openapi_config=None, logging_config=None)


async def serve(cfg: ModelConfig) -> None:
    """Build the engine, then serve the protocol until SIGTERM/SIGINT."""
    import uvicorn

    started = time.monotonic()
    engine = build_engine(cfg)
    # start-up, before the server runs: nothing else on the loop yet to block (build_engine blocks too)
    template = Path(cfg.chat_template).expanduser().read_text() if cfg.chat_template else None  # noqa: ASYNC240
    service = EngineService(engine, cfg.name, template)
    server = SignalFreeServer(
        uvicorn.Config(create_engine_app(service, os.environ.get(protocol.TOKEN_ENV)), host=cfg.host, port=cfg.port,
                       log_level="warning", access_log=False,
                       timeout_keep_alive=protocol.ENGINE_KEEP_ALIVE)
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGTERM also comes when the launcher dies
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    print(f"fleet engine {cfg.name}: model loaded in {time.monotonic() - started:.1f}s, serving on {cfg.host}:{cfg.port}", flush=True)
    try:
        await server.serve()
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the engine process."""
    parser = argparse.ArgumentParser(prog="python -m fleet.engine", description=__doc__)
    parser.add_argument("--model-json", required=True, help="the model's fleet.toml entry as JSON")
    ns = parser.parse_args(argv)
    die_with_parent()
    # Until the server runs (loading takes a while), SIGTERM unwinds through the clean-up below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = ModelConfig.model_validate_json(ns.model_json)
    if cfg.on_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    run: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(cfg))
    finally:
        reap_children()  # whatever of vLLM's helpers did not exit with it


if __name__ == "__main__":
    main()
