"""The null engine: speaks fleet's internal protocol (fleet/protocol.py) and answers at once.

Started by the launcher like the real engine, ``python bench/null_engine.py --model-json '<ModelConfig
JSON>'`` (`null_command` builds that line for `fleet.run.launcher.Fleet(config, command=null_command)`).
It imports neither vllm nor torch: with it, everything a benchmark measures is the gateway's.

Every /generate answers, in one write: a `Prompt` frame (one token id per prompt word), one `Delta`
per output token (text " tok", the last one with finish_reason "length"), then `Done` - the frames
a real engine sends for a request with ``ignore_eos``, just without waiting for a model. The number
of output tokens is the request's ``max_tokens`` (times ``n``), or ``engine_args.null_tokens`` when
the fleet file sets it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `fleet` and `bench` importable
    sys.path.insert(0, str(ROOT))

from bench import tinyhttp
from fleet.config.model import ModelConfig
from fleet.config.schema import ENGINE_SOCKET_ENV
from fleet.wire import protocol
from fleet.wire.mux import Answer, EngineSide

NULL_ENGINE = Path(__file__).resolve()
TOKEN_ID = 1000
_decode_request = protocol.decoder(protocol.GenerateRequest).decode


def null_command(cfg: ModelConfig) -> list[str]:
    """The launcher's engine command for a null engine."""
    return [sys.executable, str(NULL_ENGINE), "--model-json", cfg.model_dump_json()]


def generate_body(req: protocol.GenerateRequest, fixed_tokens: int | None = None) -> bytes:
    """The whole /generate response for one request."""
    prompt = req.prompt
    n_prompt = len(prompt) if isinstance(prompt, list) else len(str(prompt).split()) if isinstance(prompt, str) else 8
    tokens = fixed_tokens if fixed_tokens is not None else req.sampling.max_tokens
    out = bytearray(protocol.encode_frame(protocol.Prompt(token_ids=list(range(n_prompt)))))
    for i in range(req.sampling.n):
        if req.final_only:  # each choice once, whole, as fleet's engine sends it then
            out += protocol.encode_frame(protocol.Delta(index=i, text=" tok" * tokens,
                                                        token_ids=[TOKEN_ID + k for k in range(tokens)], finish_reason="length"))
            continue
        for k in range(tokens):
            last = k == tokens - 1
            out += protocol.encode_frame(
                protocol.Delta(index=i, text=" tok", token_ids=[TOKEN_ID + k], finish_reason="length" if last else None)
            )
    out += protocol.encode_frame(protocol.Done(prompt_tokens=n_prompt, completion_tokens=tokens * req.sampling.n))
    return bytes(out)


def make_handler(cfg: ModelConfig) -> tinyhttp.Handler:
    """The protocol's three routes."""
    fixed = cfg.engine_args.get("null_tokens")
    fixed = int(fixed) if fixed is not None else None
    info = protocol.encode(
        protocol.EngineInfo(
            model=cfg.name, max_model_len=cfg.max_model_len or 2048, vocab_size=49152, eos_token_id=2,
            vllm_version="null", device="none", chat_template=True,
        )
    )
    ok = tinyhttp.Response(200, b"ok", "text/plain")
    info_response = tinyhttp.Response(200, info, "application/msgpack")

    def handle(method: str, path: str, body: bytes) -> tinyhttp.Response:
        if path == "/generate" and method == "POST":
            try:
                req = _decode_request(body)
            except Exception as e:  # a malformed request is the client's bug
                return tinyhttp.Response(400, str(e).encode(), "text/plain")
            return tinyhttp.Response(200, generate_body(req, fixed), protocol.CONTENT_TYPE)
        if path == "/health":
            return ok
        if path == "/info":
            return info_response
        return tinyhttp.Response(404, b"not found", "text/plain")

    return handle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="null_engine.py", description=__doc__)
    parser.add_argument("--model-json", required=True, help="the model's fleet.toml entry as JSON")
    ns = parser.parse_args(argv)
    tinyhttp.die_with_parent()
    cfg = ModelConfig.model_validate_json(ns.model_json)
    unix = os.environ.get(ENGINE_SOCKET_ENV) or None  # the launcher's gateway comes there, as to fleet's engine
    routes = mux_routes(cfg)
    tinyhttp.run(make_handler(cfg), cfg.host, cfg.port, f"null engine {cfg.name}: serving on {cfg.host}:{cfg.port}", unix,
                 mux=lambda: EngineSide(routes, None, 1 << 26))


def mux_routes(cfg: ModelConfig) -> dict[str, Answer]:
    """/generate on the gateway's one connection (fleet.wire.mux): the same answer, in one piece."""
    fixed = cfg.engine_args.get("null_tokens")
    fixed = int(fixed) if fixed is not None else None

    async def answer(body: bytes) -> AsyncIterator[bytes]:
        yield body

    return {"/generate": lambda body: answer(generate_body(_decode_request(body), fixed))}


if __name__ == "__main__":
    main()
