"""The engine's CPU for the Responses API's `truncation: "auto"` on a long conversation: the
search for the fewest oldest turns to leave out (EngineService.chat_ids) with a real tokenizer and
chat template, no vLLM. It runs on the engine's event loop, so its time is every stream's wait.

    .venv/bin/python bench/truncation.py --tokenizer DIR [--exchanges 1000] [--context 2048] [--repeat 2]

Compare two checkouts by running it with each on PYTHONPATH, in turns.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec

from fleet.engine.encoding import encoder
from fleet.engine.service import EngineService
from fleet.wire import protocol

SAID = "lorem ipsum dolor sit amet " * 18  # ~500 characters a message


def conversation(exchanges: int) -> protocol.Chat:
    messages = [protocol.ChatMessage("system", "be brief")]
    for t in range(exchanges):
        messages += [protocol.ChatMessage("user", f"turn {t} {SAID}"), protocol.ChatMessage("assistant", f"reply {t} {SAID}")]
    return protocol.Chat(messages=[*messages, protocol.ChatMessage("user", "and now?")], truncate=True)


def service(tokenizer_dir: str, context: int) -> EngineService:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    s = EngineService.__new__(EngineService)  # no vLLM engine: only the prompt's ids are under test
    s.tokenizer, s.chat_template, s.name, s.max_model_len = tokenizer, tokenizer.chat_template, "m", context
    s.encode = encoder(tokenizer)  # type: ignore[method-assign]
    return s


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a model folder with a tokenizer and a chat template")
    ap.add_argument("--exchanges", type=int, default=1000)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--need", type=int, default=64, help="tokens of room the answer needs")
    ap.add_argument("--repeat", type=int, default=2)
    ns = ap.parse_args(argv)
    s, chat = service(ns.tokenizer, ns.context), conversation(ns.exchanges)
    chars = sum(len(m.content) for m in chat.messages)
    for _ in range(ns.repeat):
        t0 = time.perf_counter()
        whole = s.encode(s.render_chat(msgspec.structs.replace(chat, truncate=False)), False)
        t1 = time.perf_counter()
        kept = s.chat_ids(chat, ns.need)
        t2 = time.perf_counter()
        print(f"{chars:,} characters, {len(whole):,} tokens: one render and encode {t1 - t0:.3f} s; "
              f"truncated to {len(kept):,} tokens in {t2 - t1:.3f} s", flush=True)


if __name__ == "__main__":
    main()
