"""An instant OpenAI-shaped server: the upstream for LiteLLM in the gateway-overhead benchmark.

``python bench/stub_openai.py --port 8101 [--host 127.0.0.1]``. It answers ``/v1/completions`` and
``/v1/chat/completions`` (whole or streamed, ``stream_options.include_usage`` honoured) with
``max_tokens`` tokens of text " tok" at once, plus ``/v1/models`` and ``/health``. It is
the OpenAI-protocol twin of null_engine.py and runs on the same tiny server (tinyhttp.py), so
LiteLLM's upstream is exactly as instant as fleet's. Answers are cached by shape: it spends
less time per request than the null engine does.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import tinyhttp

MODEL = "stub"
CREATED = 1_700_000_000
PROMPT_TOKENS = 8


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@lru_cache(maxsize=256)
def answer(chat: bool, tokens: int, stream: bool, include_usage: bool, model: str) -> tuple[bytes, str]:
    """(body, content type) for one request shape."""
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": tokens, "total_tokens": PROMPT_TOKENS + tokens}
    obj = "chat.completion" if chat else "text_completion"
    rid = "chatcmpl-stub" if chat else "cmpl-stub"
    if not stream:
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": " tok" * tokens},
                      "logprobs": None, "finish_reason": "length"}
        else:
            choice = {"index": 0, "text": " tok" * tokens, "logprobs": None, "finish_reason": "length"}
        return _dump({"id": rid, "object": obj, "created": CREATED, "model": model,
                      "choices": [choice], "usage": usage}), "application/json"
    events = []
    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    for k in range(tokens):
        reason = "length" if k == tokens - 1 else None
        if chat:
            delta = {"role": "assistant", "content": " tok"} if k == 0 else {"content": " tok"}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": " tok", "logprobs": None, "finish_reason": reason}
        events.append({"id": rid, "object": chunk_obj, "created": CREATED, "model": model, "choices": [choice]})
    if include_usage:
        events.append({"id": rid, "object": chunk_obj, "created": CREATED, "model": model, "choices": [], "usage": usage})
    body = b"".join(b"data: " + _dump(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return body, "text/event-stream"


def handle(method: str, path: str, body: bytes) -> tinyhttp.Response:
    if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
        try:
            req = json.loads(body)
        except ValueError:
            return tinyhttp.Response(400, _dump({"error": {"message": "invalid JSON", "type": "invalid_request_error"}}))
        tokens = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        stream = bool(req.get("stream"))
        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        data, ctype = answer(path.endswith("chat/completions"), tokens, stream, include_usage, str(req.get("model", MODEL)))
        return tinyhttp.Response(200, data, ctype)
    if path in ("/health", "/v1/health"):
        return tinyhttp.Response(200, b"ok", "text/plain")
    if path == "/v1/models":
        return tinyhttp.Response(200, _dump({"object": "list", "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "stub"}]}))
    return tinyhttp.Response(404, _dump({"error": {"message": f"no route {path}", "type": "invalid_request_error"}}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="stub_openai.py", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    ns = parser.parse_args(argv)
    tinyhttp.die_with_parent()
    tinyhttp.run(handle, ns.host, ns.port, f"stub openai: serving on {ns.host}:{ns.port}")


if __name__ == "__main__":
    main()
