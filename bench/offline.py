"""The engine's ceiling: vLLM's offline `LLM.generate` on the benchmark's prompts, no server at all.

    python bench/offline.py --model <dir> --spec '<JSON>' --out result.json

The spec gives the prompts, max_tokens, the engine settings and the load points
``[[concurrency, requests], ...]``. Each point runs its requests in waves of `concurrency`
prompts (one `generate` call per wave). Every request asks for exactly max_tokens tokens
(ignore_eos), so all requests of a wave finish together: a wave is exactly what a closed loop of
`concurrency` clients keeps in flight, without HTTP, SSE or the asyncio front end.
Run by bench/run.py in a subprocess (vLLM spawns processes: the `__main__` guard is required).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(prog="offline.py", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--spec", required=True, help="JSON: prompts, max_tokens, engine, points")
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args()
    spec = json.loads(ns.spec)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

    started = time.monotonic()
    from vllm import LLM, SamplingParams

    e = spec["engine"]
    llm = LLM(
        model=ns.model, max_model_len=e["max_model_len"], enforce_eager=e["enforce_eager"],
        kv_cache_memory_bytes=int(e["kv_cache_gib"] * (1 << 30)), max_num_seqs=e["max_num_seqs"],
        max_num_batched_tokens=e["max_num_batched_tokens"], disable_log_stats=True,
    )
    load_s = time.monotonic() - started
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    prompts: list[str] = spec["prompts"]
    llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up, as the servers get

    points = []
    for concurrency, requests in spec["points"]:
        done = tokens = 0
        t0 = time.perf_counter()
        while done < requests:
            batch = [prompts[(done + i) % len(prompts)] for i in range(min(concurrency, requests - done))]
            outs = llm.generate(batch, params, use_tqdm=False)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
            done += len(batch)
        wall = time.perf_counter() - t0
        points.append({
            "mode": "offline", "concurrency": concurrency, "requests": requests, "ok": done, "errors": 0,
            "wall_s": round(wall, 3), "req_per_s": round(done / wall, 3),
            "output_tok_per_s": round(tokens / wall, 2), "output_tokens": tokens,
        })
        print(f"offline c={concurrency}: {done / wall:.2f} req/s, {tokens / wall:.1f} tok/s", flush=True)
    ns.out.write_text(json.dumps({"load_s": round(load_s, 1), "points": points}))


if __name__ == "__main__":
    main()
