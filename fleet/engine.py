"""The engine process: one vLLM AsyncLLM in-process, serving fleet's internal protocol.

Started by the launcher as ``python -m fleet.engine --model-json '<ModelConfig JSON>'``.
It resolves the model's source (converting a GGUF once), builds the engine, then serves
``/health``, ``/info`` and ``/generate`` (see protocol.py) on the model's port. When the
gateway drops a /generate connection, the stream is cancelled and vLLM aborts the request.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import NotAuthorizedException
from litestar.response import Stream

from fleet import protocol
from fleet.config import ModelConfig
from fleet.models import resolve
from fleet.process import SignalFreeServer, die_with_parent, reap_children

log = logging.getLogger("fleet.engine")
_request_decoder = protocol.decoder(protocol.GenerateRequest)
MAX_LOGPROBS = 40
TOKEN_ENV = "FLEET_ENGINE_TOKEN"  # set by the launcher; the gateway sends it as a bearer token


class EngineService:
    """Turns protocol requests into vLLM calls and vLLM outputs into protocol frames."""

    def __init__(self, engine: Any, name: str, chat_template: str | None = None) -> None:
        from vllm import __version__ as vllm_version

        self.engine = engine
        self.name = name
        self.tokenizer = engine.get_tokenizer()
        self.chat_template = chat_template or getattr(self.tokenizer, "chat_template", None)
        model_config = engine.model_config
        self.max_model_len: int = model_config.max_model_len
        self.vocab_size: int = model_config.get_vocab_size()
        self.info = protocol.EngineInfo(
            model=name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
            vllm_version=vllm_version,
            device=str(engine.vllm_config.device_config.device_type),
            chat_template=self.chat_template is not None,
        )

    @property
    def healthy(self) -> bool:
        """False once the vLLM engine died; the launcher then restarts this process."""
        return not self.engine.errored

    def prompt_ids(self, req: protocol.GenerateRequest) -> list[int]:
        """The prompt as token ids, checked against the vocabulary and the context length."""
        if isinstance(req.prompt, str):
            ids = self.tokenizer.encode(req.prompt)
        elif isinstance(req.prompt, protocol.Chat):
            ids = self.tokenizer.encode(self.render_chat(req.prompt), add_special_tokens=False)
        else:
            ids = req.prompt
            if bad := [i for i in ids if i >= self.vocab_size]:
                raise RequestRejected(f"token id {bad[0]} is out of the vocabulary (size {self.vocab_size})", "prompt")
        room = self.max_model_len - len(ids)
        if room <= 0:
            raise RequestRejected(
                f"the prompt has {len(ids)} tokens, which fills the model's context of "
                f"{self.max_model_len} tokens and leaves no room to generate",
                "prompt",
            )
        if req.sampling.max_tokens > room and not req.sampling.clamp_max_tokens:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                f"{len(ids)} tokens, so max_tokens can be at most {room}, got {req.sampling.max_tokens}",
                "max_tokens",
            )
        return ids

    def render_chat(self, chat: protocol.Chat) -> str:
        """The conversation as prompt text, through the model's chat template."""
        if self.chat_template is None:
            raise RequestRejected(
                f"model {self.name!r} has no chat template; set chat_template in fleet.toml or use /v1/completions",
                "messages",
            )
        try:
            return self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in chat.messages],
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=chat.add_generation_prompt and not chat.continue_final_message,
                continue_final_message=chat.continue_final_message,
            )
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages
            raise RequestRejected(f"the chat template cannot render these messages: {e}", "messages") from None

    def sampling_params(self, s: protocol.SamplingParams, room: int, final_only: bool = False) -> Any:
        """vLLM SamplingParams for one request: streaming deltas, or each output once when it ends."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        structured = None
        if s.json_schema is not None:
            structured = StructuredOutputsParams(json=s.json_schema)
        elif s.json_object:
            structured = StructuredOutputsParams(json_object=True)
        return SamplingParams(
            n=s.n,
            max_tokens=min(s.max_tokens, room),
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=0 if s.top_k == -1 else s.top_k,
            min_p=s.min_p,
            seed=s.seed,
            stop=s.stop or None,
            stop_token_ids=s.stop_token_ids or None,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty,
            logit_bias=s.logit_bias,
            min_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            prompt_logprobs=s.prompt_logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
        )

    def token_text(self, token_id: int, logprob: Any) -> str:
        """The text of one token as the logprobs report it."""
        text = getattr(logprob, "decoded_token", None)
        return text if text is not None else self.tokenizer.decode([token_id])

    def position(self, token_id: int, entries: dict[int, Any] | None) -> protocol.TokenLogprob:
        """One position's logprob and alternatives, best first (the chosen token included)."""
        if not entries:
            return protocol.TokenLogprob(self.tokenizer.decode([token_id]), None, None)
        chosen = entries.get(token_id)
        top = sorted(entries.items(), key=lambda kv: kv[1].logprob, reverse=True)
        return protocol.TokenLogprob(
            self.token_text(token_id, chosen) if chosen else self.tokenizer.decode([token_id]),
            chosen.logprob if chosen else None,
            [(self.token_text(t, lp), lp.logprob) for t, lp in top],
        )

    async def frames(self, req: protocol.GenerateRequest) -> AsyncIterator[bytes]:
        """The /generate response body: Prompt, Deltas, then Done or Error."""
        try:
            ids = self.prompt_ids(req)
        except RequestRejected as e:
            yield protocol.encode_frame(protocol.Error(str(e), status=400, param=e.param))
            return
        if req.beam is not None:
            from fleet.beam import beam_search_frames

            async for chunk in beam_search_frames(self, req, ids):
                yield chunk
            return
        params = self.sampling_params(req.sampling, self.max_model_len - len(ids), req.final_only)
        completion_tokens = 0
        first = True
        try:
            async for out in self.engine.generate({"prompt_token_ids": ids}, params, req.request_id):
                chunk = bytearray()
                if first:
                    first = False
                    chunk += protocol.encode_frame(self.prompt_frame(ids, out.prompt_logprobs, req.echo))
                for c in out.outputs:
                    completion_tokens += len(c.token_ids)
                    logprobs = None
                    if c.logprobs is not None:
                        logprobs = [self.position(t, e) for t, e in zip(c.token_ids, c.logprobs)]
                    chunk += protocol.encode_frame(
                        protocol.Delta(
                            index=c.index,
                            text=c.text,
                            token_ids=list(c.token_ids),
                            logprobs=logprobs,
                            finish_reason=c.finish_reason,
                            cumulative_logprob=c.cumulative_logprob,
                        )
                    )
                if chunk:
                    yield bytes(chunk)
        except ValueError as e:  # vLLM's request validation
            yield protocol.encode_frame(protocol.Error(str(e), status=400))
            return
        except Exception as e:  # noqa: BLE001 - reported to the gateway, never swallowed
            log.exception("request %s failed", req.request_id)
            yield protocol.encode_frame(protocol.Error(f"engine error: {type(e).__name__}: {e}", status=500))
            return
        yield protocol.encode_frame(protocol.Done(prompt_tokens=len(ids), completion_tokens=completion_tokens))

    def prompt_frame(self, ids: list[int], prompt_logprobs: Any, echo: bool) -> protocol.Prompt:
        """The Prompt frame: token ids, text for echo, and per-token logprobs when asked."""
        logprobs = None
        if prompt_logprobs is not None:
            logprobs = [
                protocol.TokenLogprob(self.tokenizer.decode([t]), None, None) if e is None else self.position(t, e)
                for t, e in zip(ids, prompt_logprobs)
            ]
        return protocol.Prompt(token_ids=ids, text=self.tokenizer.decode(ids) if echo else None, logprobs=logprobs)


class RequestRejected(Exception):
    """A request the engine refuses before generating (HTTP 400 at the gateway)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def create_engine_app(service: EngineService, token: str | None = None) -> Litestar:
    """The internal-protocol HTTP app around one engine; with a token, /info and /generate need it."""
    info_body = protocol.encode(service.info)
    expected = f"Bearer {token}".encode() if token else None

    async def require_token(request: Request) -> None:
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
    async def generate(request: Request) -> Stream:
        req = _request_decoder.decode(await request.body())
        return Stream(service.frames(req), media_type=protocol.CONTENT_TYPE)

    return Litestar([health, info, generate], openapi_config=None, logging_config=None)


def build_engine(cfg: ModelConfig) -> Any:
    """Resolve the source and start vLLM's AsyncLLM for one model, with `vllm serve`'s defaults.

    vLLM picks scheduler defaults by usage context: `vllm serve` is OPENAI_API_SERVER (on an
    H100/H200: 1024 sequences at once, 8192 batched tokens), while AsyncLLM's own default,
    ENGINE_CONTEXT, falls back to 128 sequences and 2048 tokens on every device. fleet serves the
    same OpenAI API, so its engine gets the same defaults; `engine_args` in fleet.toml still wins.
    """
    from vllm import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM

    model = resolve(cfg.source)
    args: dict[str, Any] = dict(
        model=model,
        served_model_name=cfg.name,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.memory_fraction,
        enforce_eager=cfg.eager,
        dtype=cfg.dtype,
        disable_log_stats=True,
        max_logprobs=MAX_LOGPROBS,  # beam search asks for 2 * width alternatives per step
    )
    if cfg.kv_cache_bytes is not None:
        args["kv_cache_memory_bytes"] = cfg.kv_cache_bytes
    args.update(cfg.engine_args)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args), usage_context=UsageContext.OPENAI_API_SERVER)


async def serve(cfg: ModelConfig) -> None:
    """Build the engine, then serve the protocol until SIGTERM/SIGINT."""
    import uvicorn

    started = time.monotonic()
    engine = build_engine(cfg)
    template = Path(cfg.chat_template).expanduser().read_text() if cfg.chat_template else None
    service = EngineService(engine, cfg.name, template)
    server = SignalFreeServer(
        uvicorn.Config(create_engine_app(service, os.environ.get(TOKEN_ENV)), host=cfg.host, port=cfg.port,
                       log_level="warning", access_log=False)
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
