"""A fake engine: a real subprocess that speaks fleet's internal protocol, without vLLM or torch.

Started like the real engine, ``python tests/fake_engine.py --model-json '<ModelConfig JSON>'``
(`fake_command` builds that line, so tests run it through `Fleet(config, command=fake_command)`).

Generation is deterministic. A "token" is a word: a text prompt has one token per
whitespace-separated word, a token-id prompt one per id. Choice `i` of a request with
`sampling.n == 1` produces `" w0 w1 w2 ..."`; with `n > 1` choice `i` produces
`" c{i}w0 c{i}w1 ..."` (`w` is the model's `fake_word`, to tell models apart). One Delta per
token, interleaved over the indexes; token ids count up from `TOKEN_ID_BASE`. A choice ends
with "length" at max_tokens, or with "stop" where a stop string would appear (the text then
ends just before it, as vLLM does). The context is `fake_max_model_len` (64) tokens:
too long a prompt or max_tokens is an `Error(status=400, param=...)`, unless
`clamp_max_tokens` shrinks max_tokens to the room left, as the real engine does.

Logprobs: every token of choice `i` has logprob `token_logprob(i)`, a value that is NOT
monotonic in `i` (0 -> -0.4, 1 -> -0.1, 2 -> -0.8, 3 -> -0.5, ...), so a test can check that
best_of keeps the highest cumulative logprobs, not the lowest indexes. Like vLLM,
`cumulative_logprob` is only sent when the request asks for logprobs or for it alone
(`cumulative_logprob`, best_of's ranking), per-token logprobs only in the first case.

Misbehaviour comes from the model's `engine_args` table (fleet.toml's free pass-through dict):

- ``fake_start_delay``: seconds during which /health answers 503 before it turns 200.
- ``fake_exit_at_start``: print a few log lines, then exit with this code before ready.
- ``fake_fail_start_while``: a file's path: exit (code 3) at start while that file exists.
- ``fake_hang_at_start``: /health answers 503 for ever.
- ``fake_hold_start_while``: a file's path: /health answers 503 while that file exists (a test
  holds the start until it has seen what it waits for, then deletes the file).
- ``fake_ignore_sigterm``: ignore SIGTERM (the process, and a child spawned after it).
- ``fake_crash_after_requests``: serve N /generate requests; die (`os._exit(70)`) on the next.
- ``fake_token_delay``: seconds between two deltas.
- ``fake_error_mid_stream``: send an Error frame (status 500) after k deltas.
- ``fake_die_mid_stream_while``: a file's path holding a number of deaths: while it exists, a
  /generate reaching its ``fake_die_after`` th delta (default 3; a whole answer: its first) takes
  one from it (deleting it at 0) and dies (`os._exit(70)`), on whichever replica gets there first. ``fake_core_dies``: instead of dying, send the Error frame a
  real engine sends when vLLM's core died under it (status protocol.ENGINE_DIED).
- ``fake_unreadable_mid_stream``: after k deltas send a frame the gateway cannot decode (a Delta
  whose finish reason is "error", as vLLM 0.24 reports a request its scheduler ended), then stop.
- ``fake_spawn_child``: spawn a grandchild that sleeps, like vLLM's EngineCore; ``"detach"``
  puts it in its own session (a descendant that left the engine's process group).
- ``fake_max_model_len`` and ``fake_word``: see above.
- ``fake_wake_delay``: seconds /wake_up takes (/sleep and /wake_up answer as vLLM's sleep mode
  does once the engine started with ``enable_sleep_mode``; /fake/stats counts them).
- ``fake_sleep_fails``: /sleep answers 500 (the engine cannot sleep).

``GET /fake/stats`` answers JSON ``{"pid", "children", "requests", "running", "aborted",
"token_required", "refused"}``: `aborted` counts /generate streams that ended because the client
went away; `refused` counts requests turned away for a missing or wrong engine token (like the
real engine, the fake requires ``Authorization: Bearer $FLEET_ENGINE_TOKEN`` when that is set).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the fleet package importable
    sys.path.insert(0, str(ROOT))

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.handlers import BaseRouteHandler
from litestar.params import FromQuery
from litestar.response import Stream

from fleet.config.model import ModelConfig
from fleet.wire import protocol

FAKE_ENGINE = Path(__file__).resolve()
TOKEN_ID_BASE = 1000
PROMPT_ID_BASE = 500
DEFAULT_MAX_MODEL_LEN = 64
CRASH_EXIT_CODE = 70
TOKEN_ENV = "FLEET_ENGINE_TOKEN"  # as fleet/engine.py: with it set, /info and /generate need the bearer token
_request_decoder = protocol.decoder(protocol.GenerateRequest)


def fake_command(cfg: ModelConfig) -> list[str]:
    """The launcher's engine command for a fake engine (use as `Fleet(config, command=fake_command)`)."""
    return [sys.executable, str(FAKE_ENGINE), "--model-json", cfg.engine_json()]


# --- deterministic generation (tests import these to compute what to expect) ----------------


def token_logprob(index: int) -> float:
    """The logprob of every token of choice `index`: distinct for 0..9, not monotonic in `index`."""
    return -(((index * 7 + 3) % 10) + 1) / 10


def token_text(index: int, k: int, n: int, word: str = "w") -> str:
    """The k-th token of choice `index` in a request sampling `n` choices."""
    return f" {word}{k}" if n == 1 else f" c{index}{word}{k}"


def expected_text(tokens: int, *, index: int = 0, n: int = 1, word: str = "w") -> str:
    """The text of choice `index` after `tokens` tokens (no stop string)."""
    return "".join(token_text(index, k, n, word) for k in range(tokens))


def prompt_text(prompt: Any) -> str | None:
    """A text prompt as is; a conversation rendered as "role: content" lines; None for token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return None
    lines = [f"{m.role}: {m.content}" for m in prompt.messages]  # a protocol Chat
    return "\n".join(lines + (["assistant:"] if getattr(prompt, "add_generation_prompt", False) else []))


def prompt_token_count(prompt: Any) -> int:
    """Prompt tokens as the fake counts them: words of a text (or conversation), or the ids given."""
    text = prompt_text(prompt)
    return len(prompt) if text is None else len(text.split())


def prompt_ids_text(ids: Sequence[int]) -> str:
    """The text the fake 'detokenizes' a token-id prompt into (sent in the Prompt frame for echo)."""
    return "".join(f" t{i}" for i in ids)


# --- the server -------------------------------------------------------------------------------


class FakeEngine:
    """State and generation of one fake engine process."""

    def __init__(self, cfg: ModelConfig) -> None:
        args = cfg.engine_args
        self.cfg = cfg
        self.max_model_len = int(args.get("fake_max_model_len", DEFAULT_MAX_MODEL_LEN))
        self.word = str(args.get("fake_word", "w"))
        self.token_delay = float(args.get("fake_token_delay", 0.0))
        self.error_after = args.get("fake_error_mid_stream")
        self.die_while = args.get("fake_die_mid_stream_while")
        self.die_after = int(args.get("fake_die_after", 3))
        self.core_dies = bool(args.get("fake_core_dies", False))
        self.unreadable_after = args.get("fake_unreadable_mid_stream")
        self.crash_after = args.get("fake_crash_after_requests")
        self.hang = bool(args.get("fake_hang_at_start", False))
        self.hold_while = args.get("fake_hold_start_while")
        self.ready_at = time.monotonic() + float(args.get("fake_start_delay", 0.0))
        self.children: list[subprocess.Popen[bytes]] = []
        self.token = os.environ.get(TOKEN_ENV) or None
        self.requests = 0
        self.running = 0
        self.aborted = 0
        self.refused = 0
        self.asleep = 0  # the sleep level it sleeps at
        self.sleeps: list[int] = []  # the level of each sleep
        self.wakes = 0

    @property
    def healthy(self) -> bool:
        held = self.hold_while is not None and os.path.exists(self.hold_while)
        return not self.hang and not held and time.monotonic() >= self.ready_at

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "children": [c.pid for c in self.children],
            "requests": self.requests,
            "running": self.running,
            "aborted": self.aborted,
            "token_required": self.token is not None,
            "refused": self.refused,
            "asleep": self.asleep,
            "sleeps": self.sleeps,
            "wakes": self.wakes,
            "sleep_mode": bool(self.cfg.engine_args.get("enable_sleep_mode")),
        }

    def info(self) -> protocol.EngineInfo:
        return protocol.EngineInfo(
            model=self.cfg.name, max_model_len=self.max_model_len, vocab_size=32000,
            eos_token_id=2, vllm_version="fake", device="cpu",
            **({"chat_template": True} if "chat_template" in protocol.EngineInfo.__struct_fields__ else {}),
            task=self.cfg.task,
        )

    def check(self, req: protocol.GenerateRequest) -> tuple[int, protocol.Error | None]:
        """max_tokens after clamping, or the Error the real engine would send first."""
        used = prompt_token_count(req.prompt)
        room = self.max_model_len - used
        if room <= 0:
            return 0, protocol.Error(
                f"the prompt has {used} tokens, which fills the model's context of {self.max_model_len} tokens",
                status=400, param="messages" if isinstance(req.prompt, protocol.Chat) else "prompt",
            )
        max_tokens = req.sampling.max_tokens
        if max_tokens > room:
            if not req.sampling.clamp_max_tokens:
                return 0, protocol.Error(
                    f"this model's maximum context length is {self.max_model_len} tokens; the prompt has "
                    f"{used} tokens, so max_tokens can be at most {room}, got {max_tokens}",
                    status=400, param="max_tokens",
                )
            max_tokens = room
        return max_tokens, None

    def prompt_frame(self, req: protocol.GenerateRequest) -> protocol.Prompt:
        if (text := prompt_text(req.prompt)) is not None:
            ids = [PROMPT_ID_BASE + j for j in range(prompt_token_count(req.prompt))]
            tokens = [f" {w}" for w in text.split()]
        else:
            ids = list(req.prompt)
            text, tokens = prompt_ids_text(ids), [f" t{i}" for i in ids]
        logprobs = None
        if req.sampling.prompt_logprobs is not None:  # vLLM: no logprob for the first prompt token
            logprobs = [protocol.TokenLogprob(t, None if j == 0 else -1.0, None if j == 0 else [(t, -1.0)])
                        for j, t in enumerate(tokens)]
        return protocol.Prompt(token_ids=ids, text=text if req.echo else None, logprobs=logprobs)

    async def frames(self, req: protocol.GenerateRequest) -> AsyncIterator[bytes]:
        """Prompt, Deltas (one token each, interleaved over indexes), then Done or Error."""
        max_tokens, error = self.check(req)
        if error is not None:
            yield protocol.encode_frame(error)
            return
        self.running += 1
        finished = False
        try:
            yield protocol.encode_frame(self.prompt_frame(req))
            if req.tools is not None or req.reasoning:
                deltas = self.tool_deltas(req, max_tokens)
                for delta in deltas:
                    yield protocol.encode_frame(delta)
                yield protocol.encode_frame(protocol.Done(prompt_tokens=prompt_token_count(req.prompt),
                                                          completion_tokens=sum(len(d.token_ids) for d in deltas)))
                finished = True
                return
            s = req.sampling
            texts = [""] * s.n
            done = [False] * s.n
            produced = deltas = 0
            start = req.resume.generated if req.resume is not None else 0  # a continuation: its tokens go on
            for k in range(start, start + max_tokens):
                for i in range(s.n):
                    if done[i]:
                        continue
                    if self.token_delay and deltas:
                        await asyncio.sleep(self.token_delay)
                    if self.error_after is not None and deltas >= int(self.error_after):
                        yield protocol.encode_frame(
                            protocol.Error(f"fake engine failure after {deltas} deltas", status=500)
                        )
                        finished = True
                        return
                    if self.unreadable_after is not None and deltas >= int(self.unreadable_after):
                        yield protocol.encode_frame(protocol.Delta(index=i, text="", finish_reason="error"))  # type: ignore[arg-type]
                        finished = True
                        return
                    dies = deltas >= self.die_after or req.final_only  # a whole answer: before any of it (as vLLM's comes whole)
                    if dies and self.take_a_death():
                        if self.core_dies:
                            yield protocol.encode_frame(protocol.Error("the engine died: fake", status=protocol.ENGINE_DIED))
                            finished = True
                            return
                        print(f"fake engine {self.cfg.name}: dying mid-stream after {deltas} deltas", flush=True)
                        os._exit(CRASH_EXIT_CODE)
                    token = token_text(i, k, s.n, self.word)
                    before = texts[i]
                    texts[i] += token
                    reason: protocol.FinishReason | None = "length" if k == start + max_tokens - 1 else None
                    piece = token
                    hits = [texts[i].find(stop) for stop in s.stop if stop in texts[i]]
                    if hits:
                        texts[i] = texts[i][: min(hits)]
                        piece, reason = texts[i][len(before):], "stop"
                    if reason is not None:
                        done[i] = True
                    produced += 1
                    deltas += 1
                    yield protocol.encode_frame(self.delta(i, k, piece, reason, s.logprobs, s.cumulative_logprob))
            yield protocol.encode_frame(
                protocol.Done(prompt_tokens=prompt_token_count(req.prompt), completion_tokens=produced)
            )
            finished = True
        finally:
            self.running -= 1
            if not finished:
                self.aborted += 1

    def tool_deltas(self, req: protocol.GenerateRequest, max_tokens: int) -> list[protocol.Delta]:
        """A chat answer read apart, as the real engine sends one (engine/parsing.py): with reasoning
        asked, "fake thought" first; with tools, a call of the named function (or of the first tool)
        whose arguments `{"word": "w0"}` come in three pieces, then finish "stop"; without, the content "ok".
        A token a delta: max_tokens fewer cuts the answer there (finish "length")."""
        out = [protocol.Delta(index=0, token_ids=[TOKEN_ID_BASE], reasoning="fake thought")] if req.reasoning else []
        chat = req.prompt if isinstance(req.prompt, protocol.Chat) else None
        tools = (chat.tools or []) if chat else []
        if req.tools is None or not tools:
            return self.cut([*out, protocol.Delta(index=0, text="ok", token_ids=[TOKEN_ID_BASE + 1], finish_reason="stop")],
                            max_tokens)
        name = req.tools.name or tools[0].name
        pieces = ['{"word": ', f'"{self.word}0"', "}"]
        out.append(protocol.Delta(index=0, token_ids=[TOKEN_ID_BASE + 1],
                                  tool_calls=[protocol.ToolCallDelta(0, "call_fake0", name, pieces[0])]))
        out += [protocol.Delta(index=0, token_ids=[TOKEN_ID_BASE + 2 + k], tool_calls=[protocol.ToolCallDelta(0, arguments=p)],
                               finish_reason="stop" if k == len(pieces) - 2 else None) for k, p in enumerate(pieces[1:])]
        out = self.cut(out, max_tokens)
        if req.final_only:  # one Delta with everything, as the engine sends a whole answer
            merged = protocol.Delta(index=0, token_ids=[t for d in out for t in d.token_ids],
                                    finish_reason=out[-1].finish_reason, reasoning="".join(d.reasoning for d in out),
                                    tool_calls=[protocol.ToolCallDelta(0, "call_fake0", name, "".join(
                                        c.arguments for d in out for c in d.tool_calls or ()))]
                                    if any(d.tool_calls for d in out) else None)
            return [merged]
        return out

    @staticmethod
    def cut(deltas: list[protocol.Delta], max_tokens: int) -> list[protocol.Delta]:
        """An answer of a token a delta, cut at max_tokens as vLLM cuts one (finish "length")."""
        if len(deltas) <= max_tokens:
            return deltas
        return [*deltas[:max_tokens - 1], msgspec.structs.replace(deltas[max_tokens - 1], finish_reason="length")]

    def take_a_death(self) -> bool:
        """Whether to die now (fake_die_mid_stream_while): one death fewer in the file if so."""
        if self.die_while is None or not os.path.exists(self.die_while):
            return False
        left = int(Path(self.die_while).read_text() or 1) - 1
        Path(self.die_while).write_text(str(left)) if left > 0 else os.unlink(self.die_while)
        return True

    def delta(self, index: int, k: int, text: str, reason: protocol.FinishReason | None,
              logprobs: int | None, cumulative: bool = False) -> protocol.Delta:
        token_id = TOKEN_ID_BASE + k
        lp = token_logprob(index)
        if logprobs is None:
            return protocol.Delta(index=index, text=text, token_ids=[token_id], finish_reason=reason,
                                  cumulative_logprob=round(lp * (k + 1), 6) if cumulative else None)
        token = text or " "
        top = [(token, lp)] + [(f" alt{j}", lp - j) for j in range(1, logprobs + 1)]
        return protocol.Delta(
            index=index, text=text, token_ids=[token_id],
            logprobs=[protocol.TokenLogprob(token, lp, top)],
            finish_reason=reason, cumulative_logprob=round(lp * (k + 1), 6),
        )


def create_fake_app(engine: FakeEngine) -> Litestar:
    """The internal-protocol app of the fake engine (same shape as fleet.engine.server.create_engine_app)."""
    info_body = protocol.encode(engine.info())

    def require_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if engine.token is not None and connection.headers.get("authorization") != f"Bearer {engine.token}":
            engine.refused += 1
            raise NotAuthorizedException("this engine answers only its fleet's gateway")

    @get("/health", sync_to_thread=False)
    def health() -> Response[bytes]:
        ok = engine.healthy
        return Response(b"ok" if ok else b"loading", status_code=200 if ok else 503)

    @get("/info", sync_to_thread=False, guards=[require_token])
    def info() -> Response[bytes]:
        return Response(info_body, media_type="application/msgpack")

    @get("/fake/stats", sync_to_thread=False)
    def stats() -> dict[str, Any]:
        return engine.stats()

    @post("/generate", status_code=200, guards=[require_token])
    async def generate(request: Request) -> Stream:
        req = _request_decoder.decode(await request.body())
        if engine.crash_after is not None and engine.requests >= int(engine.crash_after):
            print(f"fake engine {engine.cfg.name}: crashing on request {engine.requests + 1}", flush=True)
            os._exit(CRASH_EXIT_CODE)
        engine.requests += 1
        if engine.asleep:  # the gateway never sends to a sleeping engine: say so loudly if it does
            print(f"fake engine {engine.cfg.name}: a request while asleep", flush=True)
            return Stream(iter([protocol.encode_frame(protocol.Error(message="asleep", status=500))]),
                          media_type=protocol.CONTENT_TYPE)
        return Stream(engine.frames(req), media_type=protocol.CONTENT_TYPE)

    @post("/sleep", status_code=200, guards=[require_token])
    async def sleep(level: FromQuery[int] = 1) -> Response[bytes]:
        if not engine.cfg.engine_args.get("enable_sleep_mode") or engine.cfg.engine_args.get("fake_sleep_fails"):
            return Response(b"sleep mode is off", status_code=500)
        engine.asleep = level
        engine.sleeps.append(level)
        return Response(b'{"sleeping": true}', media_type="application/json")

    @post("/wake_up", status_code=200, guards=[require_token])
    async def wake_up() -> Response[bytes]:
        await asyncio.sleep(float(engine.cfg.engine_args.get("fake_wake_delay", 0.0)))
        engine.asleep = 0
        engine.wakes += 1
        return Response(b'{"sleeping": false}', media_type="application/json")

    def frames_of(*frames: protocol.Frame) -> Response[bytes]:
        return Response(b"".join(protocol.encode_frame(f) for f in frames), media_type=protocol.CONTENT_TYPE)

    @post("/tokenize", status_code=200, guards=[require_token])
    async def tokenize(request: Request) -> Response[bytes]:
        req = protocol.decoder(protocol.TokenizeRequest).decode(await request.body())
        words = (prompt_text(req.prompt) or "").split()
        ids = [word_id(w) for w in words]
        return frames_of(protocol.Tokens(ids, engine.max_model_len, words if req.token_strs else None),
                         protocol.Done(prompt_tokens=len(ids), completion_tokens=0))

    @post("/detokenize", status_code=200, guards=[require_token])
    async def detokenize(request: Request) -> Response[bytes]:
        req = protocol.decoder(protocol.DetokenizeRequest).decode(await request.body())
        return frames_of(protocol.Text(prompt_ids_text(req.ids)), protocol.Done(prompt_tokens=len(req.ids), completion_tokens=0))

    @post("/embed", status_code=200, guards=[require_token])
    async def embed(request: Request) -> Response[bytes]:
        return frames_of(*embed_frames(engine, protocol.decoder(protocol.EmbedRequest).decode(await request.body())))

    return Litestar([health, info, stats, generate, tokenize, detokenize, embed, sleep, wake_up], openapi_config=None,
                    logging_config=None)


def fake_mux_routes(engine: FakeEngine) -> dict[str, Any]:
    """The frame routes on the gateway's one connection (fleet.wire.mux), as the HTTP ones answer."""

    async def frames_of(*frames: protocol.Frame) -> AsyncIterator[bytes]:
        for frame in frames:
            yield protocol.encode_frame(frame)

    def generate(body: bytes) -> AsyncIterator[bytes]:
        req = _request_decoder.decode(body)
        if engine.crash_after is not None and engine.requests >= int(engine.crash_after):
            print(f"fake engine {engine.cfg.name}: crashing on request {engine.requests + 1}", flush=True)
            os._exit(CRASH_EXIT_CODE)
        engine.requests += 1
        if engine.asleep:
            print(f"fake engine {engine.cfg.name}: a request while asleep", flush=True)
            return frames_of(protocol.Error(message="asleep", status=500))
        return engine.frames(req)

    def tokenize(body: bytes) -> AsyncIterator[bytes]:
        req = protocol.decoder(protocol.TokenizeRequest).decode(body)
        words = (prompt_text(req.prompt) or "").split()
        ids = [word_id(w) for w in words]
        return frames_of(protocol.Tokens(ids, engine.max_model_len, words if req.token_strs else None),
                         protocol.Done(prompt_tokens=len(ids), completion_tokens=0))

    def detokenize(body: bytes) -> AsyncIterator[bytes]:
        req = protocol.decoder(protocol.DetokenizeRequest).decode(body)
        return frames_of(protocol.Text(prompt_ids_text(req.ids)), protocol.Done(prompt_tokens=len(req.ids), completion_tokens=0))

    def embed(body: bytes) -> AsyncIterator[bytes]:
        return frames_of(*embed_frames(engine, protocol.decoder(protocol.EmbedRequest).decode(body)))

    return {"/generate": generate, "/tokenize": tokenize, "/detokenize": detokenize, "/embed": embed}


def embed_frames(engine: FakeEngine, req: protocol.EmbedRequest) -> list[protocol.Frame]:
    """/embed's answer: a vector per input, then Done (or a 400 for dimensions it cannot give)."""
    engine.requests += 1
    dims = int(engine.cfg.engine_args.get("fake_dimensions", 8))
    if req.dimensions is not None and not engine.cfg.engine_args.get("fake_matryoshka"):
        return [protocol.Error("this model does not support matryoshka representation", 400, "dimensions")]
    out: list[protocol.Frame] = []
    total = 0
    for i, item in enumerate(req.inputs):
        tokens = len(item.split()) if isinstance(item, str) else len(item)
        total += tokens
        out.append(protocol.Embedding(i, fake_vector(str(item), req.dimensions or dims), tokens))
    return [*out, protocol.Done(prompt_tokens=total, completion_tokens=0)]


def word_id(word: str) -> int:
    """The fake tokenizer's id of a word."""
    return zlib.crc32(word.encode()) % 32000


def fake_vector(text: str, dims: int) -> bytes:
    """A deterministic unit vector for a text: the same text, the same vector."""
    import array
    import math

    values = [((zlib.crc32(f"{text}/{k}".encode()) % 2001) - 1000) / 1000 for k in range(dims)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array.array("f", [v / norm for v in values]).tobytes()


def spawn_child(mode: Any) -> subprocess.Popen[bytes]:
    """A grandchild of the launcher that does nothing for a while (bounded, should a test leak it)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"],
        start_new_session=(mode == "detach"),
        stdin=subprocess.DEVNULL,
    )


def die_with_parent() -> None:
    """As fleet/engine.py does: ask Linux for SIGTERM when the launcher dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fake_engine.py", description=__doc__)
    parser.add_argument("--model-json", required=True)
    ns = parser.parse_args(argv)
    die_with_parent()
    cfg = ModelConfig.model_validate_json(ns.model_json)
    args = cfg.engine_args
    name = cfg.name
    print(f"fake engine {name}: loading (pid {os.getpid()})", flush=True)
    ignore_sigterm = bool(args.get("fake_ignore_sigterm", False))
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by a child spawned below
    engine = FakeEngine(cfg)
    if mode := args.get("fake_spawn_child"):  # it inherits stdout, as vLLM's EngineCore does
        child = spawn_child(mode)
        engine.children.append(child)
        print(f"fake engine {name}: spawned child pid {child.pid} ({mode})", flush=True)
    if (blocker := args.get("fake_fail_start_while")) is not None and Path(blocker).exists():
        print(f"fake engine {name}: RuntimeError: simulated start failure ({blocker} exists)", flush=True)
        sys.exit(3)
    if (code := args.get("fake_exit_at_start")) is not None:
        print(f"fake engine {name}: reading weights", flush=True)
        print(f"fake engine {name}: RuntimeError: simulated start failure (exit {code})", flush=True)
        sys.exit(int(code))

    import uvicorn

    from fleet.config.schema import ENGINE_SOCKET_ENV
    from fleet.run.process import SignalFreeServer
    from fleet.wire.mux import EngineSide

    class Server(SignalFreeServer):  # its port, and the Unix socket the launcher names, as fleet's engine
        def capture_signals(self):  # type: ignore[no-untyped-def]
            # uvicorn would install its own SIGTERM handler over the SIG_IGN set above
            return contextlib.nullcontext() if ignore_sigterm else uvicorn.Server.capture_signals(self)

    server = Server(uvicorn.Config(
        create_fake_app(engine), host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
        timeout_graceful_shutdown=2,
    ), unix_socket=os.environ.get(ENGINE_SOCKET_ENV) or None,
       mux=lambda: EngineSide(fake_mux_routes(engine), engine.token, 64 << 20))
    print(f"fake engine {name}: serving on {cfg.host}:{cfg.port}" + (f" and {server.unix_socket}" if server.unix_socket else ""),
          flush=True)
    asyncio.run(server.serve())
    print(f"fake engine {name}: stopped", flush=True)


if __name__ == "__main__":
    main()
