"""fleet vs `vllm serve`, LiteLLM in front of it, and the offline engine, on one CUDA GPU: same
model, same settings, same load, one after the other in the order `--systems` names them.

    PYTHONPATH=/root/site:. python3 bench/gpu.py --model /root/models/smollm2-135m-instruct --out $OUT \
        [--systems fleet,vllm,litellm,offline] [--litellm-path /root/litellm]

Each system gets the whole GPU in turn (two vLLM engines starting at once on one GPU stalled in
vLLM 0.24's start-up); LiteLLM is measured in front of the same `vllm serve` just measured
directly. LiteLLM runs from its own package directory (`--litellm-path`, put first on its
PYTHONPATH) or its own interpreter (`--litellm-python`), never from fleet's environment.
Loopback only; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.loadgen import closed_loop, closed_window, completion_target, summarize
from bench.systems import litellm_config

PROMPTS = [f"Write a short story about a robot number {i} who learns to paint." for i in range(64)]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200 and ('"starting"' not in r.text):
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    for p in family:
        try:
            p.kill()
        except psutil.Error:
            pass


def python_processes(root: int) -> dict[str, int]:
    """The front process, fleet's engine process (a child running fleet.engine) and vLLM's EngineCore.

    vLLM forks its EngineCore, so it has its parent's command line: it is told apart by place (a
    child of the API server, or of fleet's engine) and by that shared command line (which leaves
    out helpers such as multiprocessing's resource tracker).
    """
    def forked_child(parent: psutil.Process) -> int | None:
        cmd = parent.cmdline()
        return next((c.pid for c in parent.children() if c.cmdline() == cmd), None)

    out = {"front": root}
    front = psutil.Process(root)
    try:
        engine = next((c for c in front.children() if "fleet.engine" in " ".join(c.cmdline())), None)
        if engine is not None:
            out["fleet-engine"] = engine.pid
        core = forked_child(engine or front)
    except psutil.Error:
        core = None
    if core is not None:
        out["EngineCore"] = core
    return out


def profile(pids: dict[str, int], seconds: int, out: Path, tag: str) -> list[subprocess.Popen]:
    """py-spy record (raw, 200 Hz) of each process for `seconds`, in the background."""
    spy = os.environ.get("PY_SPY", "py-spy")
    return [subprocess.Popen([spy, "record", "-r", "200", "-f", "raw", "-d", str(seconds), "--nonblocking",
                              "-o", str(out / f"{tag}-{name}.txt"), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]


def run_points(base: str, model: str, concurrencies: list[int], max_tokens: int, front_pid: int,
               profile_at: set[int] = frozenset(), out: Path = Path("."), tag: str = "", window: float = 12.0) -> list[dict]:
    front = psutil.Process(front_pid)
    points = []
    for c in concurrencies:
        target = completion_target(base, model, PROMPTS, max_tokens, stream=True)
        asyncio.run(closed_loop(target, min(c, 16), min(c, 16)))  # warm-up
        spies = profile(python_processes(front_pid), int(window) + 3, out, f"{tag}-c{c}") if c in profile_at else []
        cpu0 = front.cpu_times()
        if window:  # steady state: tokens received within the window, after every client streams
            run = asyncio.run(closed_window(target, c, window, ramp=3, streaming_clients=c, ramp_max=60))
        else:
            run = asyncio.run(closed_loop(target, c, max(64, 4 * c), max_duration=120))
        cpu1 = front.cpu_times()
        for spy in spies:
            spy.wait()
        s = summarize(run)
        s["front_cpu_s"] = round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2)
        s["front_rss_mb"] = round(front.memory_info().rss / 2**20, 1)
        points.append(s)
        print(f"  c={c}: {s['req_per_s']} req/s, {s['output_tok_per_s']} tok/s, ttft p50 "
              f"{(s['ttft_ms'] or {}).get('p50')} ms, errors {s['errors']}, front cpu {s['front_cpu_s']} s", flush=True)
    return points


@contextlib.contextmanager
def started(name: str, argv: list[str], health: str, env: dict[str, str], out: Path) -> Iterator[subprocess.Popen]:
    """Start a server in its own process group, wait for `health`, stop it (and its family) after."""
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            ready = wait_ready(health, proc)
            print(f"{name}: ready in {ready:.0f}s", flush=True)
            proc.ready_s = round(ready, 1)  # type: ignore[attr-defined]
            yield proc
        finally:
            stop(proc)


def offline(ns: argparse.Namespace, conc: list[int], env: dict[str, str]) -> dict:
    """bench/offline.py on the GPU: the engine's ceiling, measured over the same windows."""
    spec = {"prompts": PROMPTS, "max_tokens": ns.max_tokens, "window": ns.window or 12.0, "ramp": 3, "ramp_max": 60,
            "engine": {"max_model_len": 2048, "gpu_memory_utilization": ns.memory}, "points": [[c, 0] for c in conc]}
    result = ns.out / "offline.json"
    with open(ns.out / "offline.log", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "bench" / "offline.py"), "--model", ns.model, "--spec", json.dumps(spec),
                        "--out", str(result)], stdout=log, stderr=subprocess.STDOUT, env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                       check=True, timeout=900)
    data = json.loads(result.read_text())
    for p in data["points"]:
        print(f"  c={p['concurrency']}: {p['output_tok_per_s']} tok/s", flush=True)
    return {"ready_s": data["load_s"], "points": data["points"]}


SCHEDULER_LINE = re.compile(rb"max_num_batched_tokens=(\d+)")


def scheduler_tokens(log: Path) -> int | None:
    """The tokens per step the engine's scheduler took, from vLLM's start-up line in its log
    (recorded per system: servers compared with different scheduler limits are not comparable)."""
    with contextlib.suppress(OSError):
        if found := SCHEDULER_LINE.search(log.read_bytes()):
            return int(found[1])
    return None


def run_order(systems: list[str]) -> list[str]:
    """The servers to start, in the order named (the first after a machine's start tends to measure
    low at c=1, so runs in both orders tell that apart); LiteLLM runs in front of vllm serve."""
    known = ("fleet", "vllm", "offline")
    return list(dict.fromkeys("vllm" if s == "litellm" else s for s in systems if s in (*known, "litellm")))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-bench"))
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--memory", type=float, default=0.8)
    ap.add_argument("--profile", default="", help="concurrencies at which to py-spy every Python process (PY_SPY=path)")
    ap.add_argument("--systems", default="fleet,vllm,litellm,offline")
    ap.add_argument("--window", type=float, default=12.0, help="seconds measured per point (0: 4c requests)")
    ap.add_argument("--litellm-python", default=sys.executable, help="the interpreter that runs LiteLLM")
    ap.add_argument("--litellm-path", default="", help="LiteLLM's own package directory (first on its PYTHONPATH)")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    conc = [int(x) for x in ns.concurrency.split(",")]
    systems = ns.systems.split(",")
    profile_at = {int(x) for x in ns.profile.split(",") if x}
    try:
        card = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        card = "no NVIDIA GPU"
    results: dict = {"card": card,
                     "model": ns.model, "max_tokens": ns.max_tokens, "window_s": ns.window, "systems": {}}
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}

    def measure(name: str, proc: subprocess.Popen, base: str, engine_log: Path | None = None) -> None:
        results["systems"][name] = {"ready_s": proc.ready_s,  # type: ignore[attr-defined]
                                    "max_num_batched_tokens": scheduler_tokens(engine_log) if engine_log else None,
                                    "points": run_points(base, "m", conc, ns.max_tokens, proc.pid, profile_at, ns.out, name, ns.window)}

    def run_fleet() -> None:
        toml = ns.out / "fleet.toml"
        toml.write_text(f'[gateway]\nport = 8000\n\n[[models]]\nname = "m"\nsource = "{ns.model}"\ngpus = [0]\nport = 5001\n'
                        f"max_model_len = 2048\ngpu_memory_utilization = {ns.memory}\n")
        argv = [sys.executable, "-m", "fleet.cli", "launch", "--config", str(toml), "--no-engine-logs"]
        logs = ns.out / "fleet-engine-logs"
        with started("fleet", argv, "http://127.0.0.1:8000/health", {**env, "FLEET_LOG_DIR": str(logs)}, ns.out) as proc:
            measure("fleet", proc, "http://127.0.0.1:8000", logs / "m.log")

    def run_vllm() -> None:  # vllm serve, then LiteLLM in front of that same server
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ns.model, "--served-model-name", "m",
                "--port", "8100", "--max-model-len", "2048", "--gpu-memory-utilization", str(ns.memory)]
        with started("vllm", argv, "http://127.0.0.1:8100/health", env, ns.out) as vllm:
            if "vllm" in systems:
                measure("vllm", vllm, "http://127.0.0.1:8100", ns.out / "vllm.log")
            if "litellm" in systems:
                cfg = ns.out / "litellm.yaml"
                cfg.write_text(litellm_config("http://127.0.0.1:8100", "m", name="m"))
                lenv = {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
                if ns.litellm_path:
                    lenv["PYTHONPATH"] = ns.litellm_path
                argv = [ns.litellm_python, "-m", "litellm.proxy.proxy_cli", "--config", str(cfg), "--host", "127.0.0.1",
                        "--port", "8200"]
                with started("litellm", argv, "http://127.0.0.1:8200/health/liveliness", lenv, ns.out) as proc:
                    measure("litellm", proc, "http://127.0.0.1:8200")

    def run_offline() -> None:
        print("offline: LLM engine, no server", flush=True)
        results["systems"]["offline"] = offline(ns, conc, env)

    runners = {"fleet": run_fleet, "vllm": run_vllm, "offline": run_offline}
    for name in run_order(systems):
        runners[name]()

    def tok(name: str) -> dict[str, float]:
        return {str(p["concurrency"]): p["output_tok_per_s"] for p in results["systems"].get(name, {}).get("points", [])}

    ratios = {}
    for a, b in [("fleet", "vllm"), ("fleet", "litellm"), ("fleet", "offline"), ("vllm", "offline"), ("litellm", "offline")]:
        ta, tb = tok(a), tok(b)
        if ta and tb:
            ratios[f"{a}/{b}"] = {c: round(ta[c] / tb[c], 3) for c in ta if tb.get(c)}
            print(f"{a} / {b} output tok/s:", ratios[f"{a}/{b}"], flush=True)
    results["ratios"] = ratios
    limits = {name: s["max_num_batched_tokens"] for name, s in results["systems"].items() if s.get("max_num_batched_tokens")}
    if len(set(limits.values())) > 1:
        print(f"WARNING: the engines ran with different scheduler limits (tokens per step): {limits}", flush=True)
    (ns.out / "gpu.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
