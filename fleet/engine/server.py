"""The engine process: one vLLM AsyncLLM in-process, serving fleet's internal protocol.

Started by the launcher as ``python -m fleet.engine --model-json '<ModelConfig JSON>'``.
It resolves the model's source (converting a GGUF once), builds the engine (args.py), then
serves ``/health``, ``/info`` and ``/generate`` (fleet/wire/protocol.py) on the model's port (and,
started by a launcher on this machine, on the Unix socket $FLEET_ENGINE_SOCKET names too, where
the gateway's one connection carries every frame route's requests: fleet/wire/mux.py).
When the gateway drops a /generate connection (or cancels its stream), vLLM aborts the request.
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
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, asgi, get, post
from litestar.exceptions import MethodNotAllowedException, NotAuthorizedException
from litestar.params import FromQuery, JSONBody
from litestar.types import HTTPResponseStartEvent, HTTPScope, Receive, Send

from fleet.config.model import ModelConfig
from fleet.config.schema import ENGINE_SOCKET_ENV, ENGINE_TOKEN_ENV
from fleet.engine.args import build_engine, worker_in_engine_core
from fleet.engine.service import EngineService
from fleet.errors import ClientDisconnected
from fleet.run.process import SignalFreeServer, die_with_parent, freeze_startup_heap, reap_children
from fleet.wire import mux, protocol
from fleet.wire.asgi import header, read_body, send_chunks, unless_disconnected

MAX_REQUEST_BYTES = 64 << 20  # the gateway checked the client's body already; this bounds a wrong peer
FRAMES_START: HTTPResponseStartEvent = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", protocol.CONTENT_TYPE.encode())]}


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

    @get("/stats", sync_to_thread=False)
    def stats() -> dict[str, int]:
        """This engine's own counts (JSON; counts only, open like /health): the requests it took, the
        prompt tokens of those that finished and how many of them its prefix cache held."""
        return {"requests": service.requests, "prompt_tokens": service.prompt_tokens,
                "cached_tokens": service.cached_tokens}

    @post("/sleep", before_request=require_token, status_code=200)
    async def sleep(level: FromQuery[int] = 1) -> dict[str, bool]:
        """vLLM's sleep mode (the engine started with enable_sleep_mode): the fleet puts an idle
        engine away without stopping it; it answers once asleep."""
        await service.sleep(level)
        return {"sleeping": True}

    @post("/wake_up", before_request=require_token, status_code=200)
    async def wake_up() -> dict[str, bool]:
        """Out of sleep mode; it answers once the engine serves again."""
        await service.wake_up()
        return {"sleeping": False}

    @post("/adapters/load", before_request=require_token, status_code=200)
    async def load_adapter(data: JSONBody[dict[str, str]]) -> dict[str, str]:
        """Register a LoRA adapter at run time (and load it into vLLM's CPU cache now: a bad one fails here)."""
        await service.load_adapter(data["name"], data["path"])
        return {"loaded": data["name"]}

    @post("/adapters/unload", before_request=require_token, status_code=200)
    async def unload_adapter(data: JSONBody[dict[str, str]]) -> dict[str, str]:
        """Forget a LoRA adapter: vLLM drops it, new requests naming it get a 404."""
        await service.unload_adapter(data["name"])
        return {"unloaded": data["name"]}

    def frames_route(path: str, message: type[msgspec.Struct], answer: Callable[[Any], AsyncIterator[bytes]]) -> Any:
        """A POST route whose answer is frames (wire/protocol.py), sent to the ASGI server as they come
        (a plain ASGI route: Litestar's streaming response ran each body in an anyio task group beside
        a disconnect listener, a fifth of this loop's time at 256 streams on an H200). The gateway
        closing the connection cancels the stream, and closing the frames aborts the request in vLLM."""
        decode = protocol.decoder(message).decode

        async def handle(scope: HTTPScope, receive: Receive, send: Send) -> None:
            if scope["method"] != "POST":
                raise MethodNotAllowedException(headers={"Allow": "POST"})
            if expected is not None and not hmac.compare_digest((header(scope, b"authorization") or "").encode(), expected):
                raise NotAuthorizedException("this engine answers only its fleet's gateway")
            frames = answer(decode(await read_body(scope, receive, MAX_REQUEST_BYTES)))
            try:
                await unless_disconnected(receive, _send_frames(frames, send))
            except ClientDisconnected:
                pass  # nobody left to answer
            finally:
                await frames.aclose()  # type: ignore[attr-defined]

        handle.__name__ = path.strip("/")
        return asgi(path, name=path.strip("/"), is_mount=False, copy_scope=False)(handle)

    routes = [frames_route(path, message, answer) for path, (message, answer) in frame_routes(service).items()]
    return Litestar([health, info, stats, sleep, wake_up, load_adapter, unload_adapter, *routes], openapi_config=None,
                    logging_config=None, exception_handlers={ValueError: _refused})


def frame_routes(service: EngineService) -> dict[str, tuple[type[msgspec.Struct], Callable[[Any], AsyncIterator[bytes]]]]:
    """The engine's routes whose answers are frames: each one's request message and its answer,
    served over HTTP (create_engine_app) and on the gateway's one connection (`mux_routes`)."""
    return {"/generate": (protocol.GenerateRequest, service.frames), "/embed": (protocol.EmbedRequest, service.embed),
            "/tokenize": (protocol.TokenizeRequest, service.tokenize),
            "/detokenize": (protocol.DetokenizeRequest, service.detokenize)}


def mux_routes(service: EngineService) -> dict[str, mux.Answer]:
    """The frame routes as fleet.wire.mux serves them: a request's msgpack body -> its frames."""
    def route(message: type[msgspec.Struct], answer: Callable[[Any], AsyncIterator[bytes]]) -> mux.Answer:
        decode = protocol.decoder(message).decode
        return lambda body: answer(decode(body))

    return {path: route(message, answer) for path, (message, answer) in frame_routes(service).items()}


def _refused(_: Request[Any, Any, Any], error: Exception) -> Response[dict[str, str]]:
    """An adapter the engine cannot load, or one it does not have: 400 with vLLM's words."""
    return Response({"detail": str(error)[:1000]}, status_code=400)


async def _send_frames(frames: AsyncIterator[bytes], send: Send) -> None:
    # The head goes out before the first step of `frames` starts any work: the gateway counts on it.
    # A connection that ends before a byte of the answer is a request this engine never began, which
    # the gateway then gives to another replica (errors.EngineUnreachable).
    await send(FRAMES_START)
    await send_chunks(frames, send)


VLLM_OUTPUT_LOGGER = "vllm.v1.engine.async_llm"  # logs "output_handler failed" when its EngineCore is gone


class ExpectedEngineDeath(logging.Filter):
    """Once this engine is stopping, drops vLLM's report (with its traceback) that the EngineCore
    died: the launcher's SIGTERM reaches the engine's whole process group, so the EngineCore quits
    beside this process, as asked. Until then every record passes."""

    stopping = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[0] if record.exc_info else None
        return not (self.stopping and error is not None and error.__name__ == "EngineDeadError")


async def serve(cfg: ModelConfig) -> None:
    """Build the engine, then serve the protocol until SIGTERM/SIGINT."""
    import uvicorn

    started = time.monotonic()
    engine = build_engine(cfg)
    # start-up, before the server runs: nothing else on the loop yet to block (build_engine blocks too)
    template = Path(cfg.chat_template).expanduser().read_text() if cfg.chat_template else None  # noqa: ASYNC240
    service = EngineService(engine, cfg.name, template, tool_parser=cfg.tool_parser, reasoning_parser=cfg.reasoning_parser,
                            adapters=cfg.adapters)
    token = os.environ.get(ENGINE_TOKEN_ENV)
    routes = mux_routes(service)
    server = SignalFreeServer(
        uvicorn.Config(create_engine_app(service, token), host=cfg.host, port=cfg.port,
                       log_level="warning", access_log=False, proxy_headers=False,  # its one client: the gateway
                       timeout_keep_alive=protocol.ENGINE_KEEP_ALIVE),
        unix_socket=os.environ.get(ENGINE_SOCKET_ENV) or None,  # the launcher's engines: its gateway comes there
        mux=lambda: mux.EngineSide(routes, token, MAX_REQUEST_BYTES),  # and its frame routes on one connection
    )
    freeze_startup_heap()  # vLLM and the tokenizer: walked by no full collection from here on
    loop = asyncio.get_running_loop()
    quiet = ExpectedEngineDeath()

    def stop() -> None:
        server.should_exit = True
        quiet.stopping = True

    logging.getLogger(VLLM_OUTPUT_LOGGER).addFilter(quiet)
    for sig in (signal.SIGTERM, signal.SIGINT):  # SIGTERM also comes when the launcher dies
        loop.add_signal_handler(sig, stop)
    print(f"fleet engine {cfg.name}: model loaded in {time.monotonic() - started:.1f}s, serving on {cfg.host}:{cfg.port}"
          + (f" and {server.unix_socket}" if server.unix_socket else ""), flush=True)
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
    if worker_in_engine_core(cfg, os.environ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
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
    # Stopped cleanly: the engine is shut down and its helpers are gone. What is left, the
    # interpreter's own teardown of torch and vLLM, took ~3.5 s of every stop on a CPU engine.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
