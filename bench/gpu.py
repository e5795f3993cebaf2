"""fleet vs `vllm serve` on one CUDA GPU, same model, same settings, same load, one after the other.

    PYTHONPATH=/root/site:. python3 bench/gpu.py --model /root/models/smollm2-135m-instruct --out $OUT

Each system gets the whole GPU in turn (two vLLM engines starting at once on one GPU stalled in
vLLM 0.24's start-up). Loopback only; every process started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import closed_loop, closed_window, completion_target, summarize  # noqa: E402

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-bench"))
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--memory", type=float, default=0.8)
    ap.add_argument("--profile", default="", help="concurrencies at which to py-spy every Python process (PY_SPY=path)")
    ap.add_argument("--systems", default="fleet,vllm")
    ap.add_argument("--window", type=float, default=12.0, help="seconds measured per point (0: 4c requests)")
    ns = ap.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    conc = [int(x) for x in ns.concurrency.split(",")]
    results: dict = {"card": subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip(),
                     "model": ns.model, "max_tokens": ns.max_tokens, "systems": {}}
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}

    toml = ns.out / "fleet.toml"
    toml.write_text(f'[gateway]\nport = 8000\n\n[[models]]\nname = "m"\nsource = "{ns.model}"\ngpus = [0]\nport = 5001\n'
                    f"max_model_len = 2048\ngpu_memory_utilization = {ns.memory}\n")
    for name, argv, base, health in [
        ("fleet", [sys.executable, "-m", "fleet.cli", "launch", "--config", str(toml), "--no-engine-logs"],
         "http://127.0.0.1:8000", "http://127.0.0.1:8000/health"),
        ("vllm", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ns.model,
                  "--served-model-name", "m", "--port", "8100", "--max-model-len", "2048",
                  "--gpu-memory-utilization", str(ns.memory)],
         "http://127.0.0.1:8100", "http://127.0.0.1:8100/health"),
    ]:
        if name not in ns.systems.split(","):
            continue
        log = open(ns.out / f"{name}.log", "w")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            ready = wait_ready(health, proc)
            print(f"{name}: ready in {ready:.0f}s", flush=True)
            results["systems"][name] = {"ready_s": round(ready, 1),
                                        "points": run_points(base, "m", conc, ns.max_tokens, proc.pid,
                                                                   {int(x) for x in ns.profile.split(",") if x}, ns.out, name,
                                                                   ns.window)}
        finally:
            stop(proc)
            log.close()
    f, v = results["systems"].get("fleet"), results["systems"].get("vllm")
    if f and v:
        results["ratios"] = {str(a["concurrency"]): round(a["output_tok_per_s"] / b["output_tok_per_s"], 3)
                             for a, b in zip(f["points"], v["points"]) if b["output_tok_per_s"]}
        print("fleet / vllm serve output tok/s:", results["ratios"])
    (ns.out / "gpu.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
