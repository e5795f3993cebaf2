"""fleet vs `vllm serve`, LiteLLM in front of it, and the offline engine, on one CUDA GPU: same
model, same settings, same load, one after the other in the order `--systems` names them.

    PYTHONPATH=/root/site:. python3 bench/gpu.py --model /root/models/smollm2-135m-instruct --out $OUT \
        [--systems fleet,vllm,litellm,offline] [--litellm-path /root/litellm] \
        [--together --memory 0.4 --rounds 2] [--referee] [--profile 256] [--stream-interval 4]
        [--tools named --tool-parser pythonic]   # tool calls: streamed chat, counted from usage
    # two GPUs: one engine against two replicas (GPUs 0 and 1) and `vllm serve --data-parallel-size 2`
    python3 bench/gpu.py ... --systems fleet,fleet-2r,vllm-dp --replica-gpus 0,1 --together --memory 0.3
    # tensor parallel over GPUs 0 and 1, fleet against `vllm serve --tensor-parallel-size 2`
    python3 bench/gpu.py ... --systems fleet,vllm --tp 2 --together --memory 0.4

Throughput counts tokens (bench/loadgen.py's `chunk_tokens`: each chunk's continuous usage), not
SSE chunks: a server that falls behind merges several steps into one chunk. `--referee` runs vLLM's
own `vllm bench serve` against each server too (bench/referee.py), and the ratios of both are
printed and saved.

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
from bench.loadgen import closed_loop, closed_window, closed_window_procs, completion_target, summarize, tool_call_target  # noqa: I001
from bench.referee import TOOL_CHOICES, WEATHER, Load, referee
from bench.systems import litellm_config

# Engines measured without a server (bench/offline.py): vLLM's synchronous step() loop, and AsyncLLM
# as both servers run it (only with --together --interleave)
ENGINES = ("offline", "engine")
PROMPTS = [f"Write a short story about a robot number {i} who learns to paint." for i in range(64)]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        try:
            r = httpx.get(url, timeout=2)
            models = r.json().get("models") if r.headers.get("content-type", "").startswith("application/json") else None
            states = [row["state"] for row in models] if isinstance(models, list) else list((models or {}).values())
            if r.status_code == 200 and all(state == "ready" for state in states):
                return time.monotonic() - start  # fleet: every engine ready (/fleet/status: every replica)
        except (httpx.HTTPError, ValueError):
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

    The EngineCore is told apart by place (a child of the API server, or of fleet's engine) and by
    its title: vLLM names it `VLLM::EngineCore` (setproctitle, one of its requirements), which is
    its command line from then on, whether it was forked or spawned; where no title could be set, a
    fork still has its parent's command line. Either leaves out helpers such as multiprocessing's
    resource tracker.
    """
    def cmdline(p: psutil.Process) -> list[str]:
        try:
            return p.cmdline()
        except psutil.Error:  # a child gone or a zombie meanwhile (torch's compile workers): not it
            return []

    def engine_core(parent: psutil.Process) -> int | None:
        cmd = cmdline(parent)
        return next((c.pid for c in parent.children() if "EngineCore" in " ".join(cmdline(c)) or cmdline(c) == cmd),
                    None)

    out = {"front": root}
    front = psutil.Process(root)
    try:
        engine = next((c for c in front.children() if "fleet.engine" in " ".join(cmdline(c))), None)
        if engine is not None:
            out["fleet-engine"] = engine.pid
        core = engine_core(engine or front)
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
               profile_at: set[int] = frozenset(), out: Path = Path("."), tag: str = "", window: float = 12.0,
               client_procs: int = 1, tools: str | None = None) -> list[dict]:
    """Each concurrency's point; with `client_procs` > 1 the clients run in that many processes
    (one Python process receiving ~35,000 chunks/s can be the limit itself). With `tools` ("named"
    or "required"), streamed chat completions that call bench.referee's WEATHER instead, tokens
    counted from usage and each answer's finish reason kept."""
    front = psutil.Process(front_pid)
    me = psutil.Process()
    points = []
    for c in concurrencies:
        target = (completion_target(base, model, PROMPTS, max_tokens, stream=True) if tools is None
                  else tool_call_target(base, model, PROMPTS, max_tokens, WEATHER, TOOL_CHOICES[tools]))
        asyncio.run(closed_loop(target, min(c, 16), min(c, 16)))  # warm-up
        spies = profile(python_processes(front_pid), int(window) + 3, out, f"{tag}-c{c}") if c in profile_at else []
        cpu0, mine0 = front.cpu_times(), me.cpu_times()
        if window and client_procs > 1:
            run = closed_window_procs(target, c, window, client_procs, ramp=3, streaming_clients=c, ramp_max=60)
        elif window:  # steady state: tokens received within the window, after every client streams
            run = asyncio.run(closed_window(target, c, window, ramp=3, streaming_clients=c, ramp_max=60))
        else:
            run = asyncio.run(closed_loop(target, c, max(64, 4 * c), max_duration=120))
        cpu1, mine1 = front.cpu_times(), me.cpu_times()
        for spy in spies:
            spy.wait()
        s = summarize(run)
        s["front_cpu_s"] = round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2)
        s["front_rss_mb"] = round(front.memory_info().rss / 2**20, 1)
        # the load generator's own CPU over ramp + window (a client near a whole core is the limit)
        s["client_cpu_s"] = run.extra.get("client_cpu_s") or round(
            (mine1.user + mine1.system) - (mine0.user + mine0.system), 2)
        s["client_procs"] = client_procs
        points.append(s)
        print(f"  c={c}: {s['req_per_s']} req/s, {s['output_tok_per_s']} tok/s ({s.get('tokens_per_chunk')} per chunk, "
              f"completed-only {s.get('completed_tok_per_s')}), ttft p50 {(s['ttft_ms'] or {}).get('p50')} ms, "
              f"tpot p50 {(s.get('tpot_ms') or {}).get('p50')} ms, errors {s['errors']} {s['error_examples'][:1]}, "
              f"finish {s.get('finish_reasons')}, front cpu {s['front_cpu_s']} s, client cpu {s['client_cpu_s']} s", flush=True)
    return points


@contextlib.contextmanager
def started(name: str, argv: list[str], health: str, env: dict[str, str], out: Path,
            cwd: Path | None = None) -> Iterator[subprocess.Popen]:
    """Start a server in its own process group, wait for `health`, stop it (and its family) after."""
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
        try:
            ready = wait_ready(health, proc)
            print(f"{name}: ready in {ready:.0f}s", flush=True)
            proc.ready_s = round(ready, 1)  # type: ignore[attr-defined]
            yield proc
        finally:
            stop(proc)


def offline_spec(ns: argparse.Namespace, **extra: object) -> dict:
    """bench/offline.py's spec: the servers' prompts, tokens, windows and engine settings."""
    return {"prompts": PROMPTS, "max_tokens": ns.max_tokens, "window": ns.window or 12.0, "ramp": 3, "ramp_max": 60,
            "engine": {"max_model_len": 2048, "gpu_memory_utilization": ns.memory}, **extra}


def offline(ns: argparse.Namespace, conc: list[int], env: dict[str, str]) -> dict:
    """bench/offline.py on the GPU: the engine's ceiling, measured over the same windows."""
    spec = offline_spec(ns, points=[[c, 0] for c in conc])
    result = ns.out / "offline.json"
    with open(ns.out / "offline.log", "w") as log:
        subprocess.run([sys.executable, str(ROOT / "bench" / "offline.py"), "--model", ns.model, "--spec", json.dumps(spec),
                        "--out", str(result)], stdout=log, stderr=subprocess.STDOUT, env={**env, "CUDA_VISIBLE_DEVICES": "0"},
                       check=True, timeout=900)
    data = json.loads(result.read_text())
    for p in data["points"]:
        print(f"  c={p['concurrency']}: {p['output_tok_per_s']} tok/s", flush=True)
    return {"ready_s": data["load_s"], "points": data["points"]}


def assignments(spec: str) -> dict[str, str]:
    """`KEY=VALUE,KEY=VALUE` as a dict (--old-env)."""
    pairs = [item.split("=", 1) for item in spec.split(",") if item.strip()]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise SystemExit(f"--old-env takes KEY=VALUE,...: {spec!r}")
    return {key.strip(): value for key, value in pairs}


def fleet_toml(ns: argparse.Namespace, port: int, replicas: int = 1, stream_interval: int = 1) -> str:
    """The fleet.toml of one benchmarked fleet: the gateway on `port`, model "m" with one GPU per
    replica (--replica-gpus in turn), or one replica over GPUs 0..--tp-1 (tensor parallel: a
    placement's GPU count); the engines' ports follow from the gateway's."""
    gpus = [int(g) for g in ns.replica_gpus.split(",")]
    cards = [[gpus[k % len(gpus)]] for k in range(replicas)] if replicas > 1 or ns.tp == 1 else [list(range(ns.tp))]
    places = ", ".join(f"{{ gpus = {cards[k]}, port = {5001 + 100 * (port // 100 - 80) + k} }}" for k in range(replicas))
    return (f'[gateway]\nport = {port}\n\n[[models]]\nname = "m"\nsource = "{ns.model}"\n'
            f"placements = [{places}]\nmax_model_len = 2048\ngpu_memory_utilization = {ns.memory}\n"
            + (f"kv_cache_gib = {ns.kv_cache_gib}\n" if ns.kv_cache_gib else "")
            + (f"engine_args = {{ stream_interval = {stream_interval} }}\n" if stream_interval > 1 else "")
            + (f'tool_parser = "{ns.tool_parser}"\n' if ns.tools else ""))


class OfflineTurns:
    """bench/offline.py loaded once and kept up beside the servers, measured a point at a time
    (`--interleave`): its turns alternate with theirs, so a machine's drift falls on both. `name`
    "engine": its AsyncLLM mode (both servers' engine loop without HTTP) rather than the `step()` loop."""

    def __init__(self, ns: argparse.Namespace, env: dict[str, str], name: str = "offline") -> None:
        engine = {"async": True, **({"tools": {"tool": WEATHER, "choice": ns.tools}} if ns.tools else {})}
        spec = offline_spec(ns, points=[], turns=True, **(engine if name == "engine" else {}))
        self.log = open(ns.out / f"{name}.log", "w")  # noqa: SIM115 - closed in close()
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "offline.py"), "--model", ns.model, "--spec", json.dumps(spec),
             "--out", str(ns.out / f"{name}.json")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            env={**env, "CUDA_VISIBLE_DEVICES": "0"}, text=True, start_new_session=True)
        self._answer("ready")
        self.ready_s = round(time.monotonic() - started, 1)
        print(f"{name}: ready in {self.ready_s:.0f}s", flush=True)

    def _answer(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"offline.py exited ({self.proc.wait()}) before '{prefix}': see offline.log")

    def point(self, concurrency: int) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"concurrency": concurrency}) + "\n")
        self.proc.stdin.flush()
        p: dict = json.loads(self._answer("point "))
        print(f"  c={concurrency}: {p['output_tok_per_s']} tok/s", flush=True)
        return p

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


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
    known = ("fleet", "fleet-2r", "fleet-si", "fleet-old", "vllm", "vllm-dp", *ENGINES)
    return list(dict.fromkeys("vllm" if s == "litellm" else s for s in systems if s in (*known, "litellm")))


def rounds_order(servers: list[str], rounds: int) -> list[list[str]]:
    """The order servers are measured in each round: as named, then reversed, and so on (ABBA),
    so a system measured first (or last) in one round is measured last (or first) in the next."""
    return [servers if k % 2 == 0 else servers[::-1] for k in range(rounds)]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", type=Path, default=Path("/tmp/gpu-bench"))
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--memory", type=float, default=0.8, help="gpu_memory_utilization of each engine")
    ap.add_argument("--kv-cache-gib", type=float, default=0.0, help="fleet's engines: this KV cache (skips vLLM's profiling)")
    ap.add_argument("--replica-gpus", default="0", help="fleet-2r: the GPUs its replicas take in turn (0: both on GPU 0)")
    ap.add_argument("--tp", type=int, default=1, help="fleet and vllm: tensor parallel over GPUs 0..tp-1")
    ap.add_argument("--stream-interval", type=int, default=4,
                    help="fleet-si: fleet whose engine sends a stream's tokens every this many steps (vLLM's stream_interval)")
    ap.add_argument("--profile", default="", help="concurrencies at which to py-spy every Python process (PY_SPY=path), round 1")
    ap.add_argument("--systems", default="fleet,vllm,litellm,offline",
                    help="engine: AsyncLLM without a server (only with --together --interleave)")
    ap.add_argument("--window", type=float, default=12.0, help="seconds measured per point (0: 4c requests)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every server's points, the order reversed each round")
    ap.add_argument("--together", action="store_true",
                    help="start every server once (one after the other, each with --memory) and keep them all up for the "
                         "rounds; otherwise each server has the GPU to itself in turn, one round")
    ap.add_argument("--interleave", action="store_true",
                    help="with --together: measure one concurrency at a time, the systems taking turns at it for every "
                         "round, before the next concurrency (paired rounds seconds apart)")
    ap.add_argument("--client-procs", default="1", help="client processes per point; several (1,4) are measured in turn")
    ap.add_argument("--referee", action="store_true", help="also run `vllm bench serve` against each server (bench/referee.py)")
    ap.add_argument("--referee-input-len", type=int, default=32)
    ap.add_argument("--referee-only", action="store_true", help="with --referee: no points of bench/loadgen.py")
    ap.add_argument("--referee-prompts", type=int, default=32, help="requests per referee point: max(this, 4c)")
    ap.add_argument("--old-fleet", type=Path, default=None,
                    help="system fleet-old: fleet run from this source tree (e.g. `git archive REV fleet`), old against new")
    ap.add_argument("--old-env", default="", help="fleet-old: KEY=VALUE,... set in its environment (the same tree "
                    "as fleet under another setting: `--old-fleet .`)")
    ap.add_argument("--tools", choices=("named", "required"), default=None,
                    help="streamed chat completions calling a function (bench/referee.py's), measured by the referee "
                    "alone; fleet and vllm serve with the same --tool-parser")
    ap.add_argument("--tool-parser", default="pythonic")
    ap.add_argument("--offline-concurrency", default="", help="the offline engine's points (default: --concurrency)")
    ap.add_argument("--litellm-python", default=sys.executable, help="the interpreter that runs LiteLLM")
    ap.add_argument("--litellm-path", default="", help="LiteLLM's own package directory (first on its PYTHONPATH)")
    return ap


def main() -> None:
    ns = parser().parse_args()
    ns.out = ns.out.resolve()  # fleet-old runs from its own tree
    ns.out.mkdir(parents=True, exist_ok=True)
    conc = [int(x) for x in ns.concurrency.split(",")]
    systems = ns.systems.split(",")
    profile_at = {int(x) for x in ns.profile.split(",") if x}
    try:
        card = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        card = "no NVIDIA GPU"
    results: dict = {"card": card, "model": ns.model, "max_tokens": ns.max_tokens, "window_s": ns.window,
                     "together": ns.together, "systems": {}, "rounds": []}
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1"}
    loads = [Load(c, max(ns.referee_prompts, 4 * c), ns.referee_input_len, ns.max_tokens, tools=ns.tools) for c in conc]

    def save() -> None:
        (ns.out / "gpu.json").write_text(json.dumps(results, indent=2))

    entries: dict[tuple[int, str], dict] = {}
    turns: dict[str, OfflineTurns] = {}  # the engines without a server, kept up (--together --interleave)

    def measure(name: str, proc: subprocess.Popen, base: str, k: int, engine_log: Path | None = None,
                at: list[int] | None = None) -> None:
        """Round k's points of one system (all of --concurrency, or those `at`), added to its entry."""
        tag = name if k == 0 else f"{name}-r{k + 1}"
        points = at or conc
        entry = entries.get((k, name))
        if entry is None:
            entry = entries[(k, name)] = {
                "round": k + 1, "system": name, "first": rounds_order(servers, ns.rounds)[k][0],
                "ready_s": proc.ready_s,  # type: ignore[attr-defined]
                "max_num_batched_tokens": scheduler_tokens(engine_log) if engine_log else None, "points": []}
            if k == 0:
                results["systems"][name] = entry
            results["rounds"].append(entry)
        if name in turns:
            entry["points"] += [turns[name].point(c) for c in points]
            save()
            return
        for n in (int(x) for x in ns.client_procs.split(",")) if not ns.referee_only else ():
            if n > 1:
                print(f"  ({n} client processes)", flush=True)
            entry["points"] += run_points(base, "m", points, ns.max_tokens, proc.pid, profile_at if k == 0 else set(),
                                          ns.out, tag, ns.window, n, ns.tools)
        if ns.referee:
            done = referee(base, "m", ns.model, [load for load in loads if load.concurrency in points], env=env,
                           log=ns.out / "vllm-bench.log")
            entry.setdefault("referee", []).extend(done)
            for p in done:
                print(f"  referee c={p['concurrency']}: {p['output_throughput']:.0f} tok/s, {p['completed']} done, "
                      f"{p['failed']} failed, TTFT p50 {p['median_ttft_ms']:.1f} ms", flush=True)
        save()

    def start_fleet(stack: contextlib.ExitStack, replicas: int = 1, stream_interval: int = 1,
                    source: Path | None = None) -> tuple[subprocess.Popen, str, Path]:
        """fleet over one model; with replicas, that many engines on the GPUs of --replica-gpus (in turn);
        with a stream interval, the opt-in of vLLM's `stream_interval` in the model's engine_args; with
        a source, the fleet package of that tree (fleet-old)."""
        name, port = ("fleet", 8000) if replicas == 1 else (f"fleet-{replicas}r", 8300)
        if stream_interval > 1:
            name, port = "fleet-si", 8400
        if source is not None:
            name, port = "fleet-old", 8500
        toml = ns.out / f"{name}.toml"
        toml.write_text(fleet_toml(ns, port, replicas, stream_interval))
        argv = [sys.executable, "-m", "fleet.cli", "launch", "--config", str(toml), "--no-engine-logs"]
        logs = ns.out / f"{name}-engine-logs"
        fenv = {**env, "FLEET_LOG_DIR": str(logs)}
        if source is not None:  # `python -m` puts the working folder first on the path: run from the old tree
            fenv.update(assignments(ns.old_env))
            fenv["PYTHONPATH"] = os.pathsep.join([str(source), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                                  if p and p != "."]])
        proc = stack.enter_context(started(name, argv, f"http://127.0.0.1:{port}/fleet/status", fenv, ns.out, cwd=source))
        return proc, f"http://127.0.0.1:{port}", logs / ("m.log" if replicas == 1 else "m.0.log")

    def start_vllm(stack: contextlib.ExitStack, data_parallel: int = 1) -> tuple[subprocess.Popen, str, Path]:
        """`vllm serve` over --tp GPUs (tensor parallel); with data_parallel, `vllm-dp`: that many
        engines behind one API server (`--data-parallel-size`), one GPU each."""
        name, port = ("vllm", 8100) if data_parallel == 1 else ("vllm-dp", 8600)
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ns.model, "--served-model-name", "m",
                "--port", str(port), "--max-model-len", "2048", "--gpu-memory-utilization", str(ns.memory)]
        argv += ["--data-parallel-size", str(data_parallel)] if data_parallel > 1 else ["--tensor-parallel-size", str(ns.tp)]
        if ns.tools:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", ns.tool_parser]
        proc = stack.enter_context(started(name, argv, f"http://127.0.0.1:{port}/health", env, ns.out))
        return proc, f"http://127.0.0.1:{port}", ns.out / f"{name}.log"

    def start_litellm(stack: contextlib.ExitStack) -> tuple[subprocess.Popen, str, None]:
        cfg = ns.out / "litellm.yaml"
        cfg.write_text(litellm_config("http://127.0.0.1:8100", "m", name="m"))
        lenv = {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
        if ns.litellm_path:
            lenv["PYTHONPATH"] = ns.litellm_path
        argv = [ns.litellm_python, "-m", "litellm.proxy.proxy_cli", "--config", str(cfg), "--host", "127.0.0.1",
                "--port", "8200"]
        proc = stack.enter_context(started("litellm", argv, "http://127.0.0.1:8200/health/liveliness", lenv, ns.out))
        return proc, "http://127.0.0.1:8200", None

    starters = {"fleet": start_fleet, "fleet-2r": lambda stack: start_fleet(stack, 2),
                "fleet-si": lambda stack: start_fleet(stack, stream_interval=ns.stream_interval), "vllm": start_vllm,
                "vllm-dp": lambda stack: start_vllm(stack, data_parallel=2),
                "fleet-old": lambda stack: start_fleet(stack, source=ns.old_fleet),
                "litellm": start_litellm}
    servers = [s for s in systems if s in starters]
    if "litellm" in servers and "vllm" not in servers:  # LiteLLM is measured in front of vllm serve
        servers.insert(servers.index("litellm"), "vllm")
    if ns.together:
        with contextlib.ExitStack() as stack:
            running = {}
            for name in run_order(servers):  # one after the other: two engines starting at once stalled
                running[name] = starters[name](stack)
            measured = [s for s in servers if s != "vllm" or "vllm" in systems]
            for name in (s for s in ENGINES if s in systems and ns.interleave):  # kept up too, taking turns at each point
                turns[name] = stack.enter_context(contextlib.closing(OfflineTurns(ns, env, name)))
                running[name] = (turns[name], "", None)  # type: ignore[assignment]
                servers.append(name)
                measured.append(name)
            # --interleave: each concurrency in turn, the systems taking turns at it round after round
            # (seconds apart, so a machine's slow drift falls on both); else each round all points
            for at in ([[c] for c in conc] if ns.interleave else [conc]):
                for k, order in enumerate(rounds_order(servers, ns.rounds)):
                    for name in (n for n in order if n in measured):
                        print(f"round {k + 1}: {name}" + (f" c={at[0]}" if ns.interleave else ""), flush=True)
                        proc, base, log = running[name]
                        measure(name, proc, base, k, log, at)
    else:
        for name in run_order(servers):
            if name == "litellm":
                continue
            with contextlib.ExitStack() as stack:
                proc, base, log = starters[name](stack)
                if name != "vllm" or "vllm" in systems:
                    measure(name, proc, base, 0, log)
                if name == "vllm" and "litellm" in systems:
                    lproc, lbase, _ = start_litellm(stack)
                    measure("litellm", lproc, lbase, 0)
    if "offline" in systems and not (ns.together and ns.interleave):
        print("offline: LLM engine, no server", flush=True)
        oconc = [int(x) for x in (ns.offline_concurrency or ns.concurrency).split(",")]
        results["systems"]["offline"] = offline(ns, oconc, env)
        save()
    if ns.tools:  # vLLM's scheduler ends a request whose sampled token its grammar rejects: count them per system
        results["grammar_rejected"] = {str(log.relative_to(ns.out)): log.read_text(errors="replace").count("grammar rejected tokens")
                                       for log in sorted(ns.out.rglob("*.log")) if log.name != "vllm-bench.log"}
        print(f"grammar rejections per log: {results['grammar_rejected']}", flush=True)
    report(results)
    save()


def paired_ratios(rounds: list[dict], a: str, b: str, key: str = "points",
                  field_: str = "output_tok_per_s") -> dict[str, dict[str, list[float]]]:
    """a / b at each concurrency, one ratio per round (the two systems measured in the same round),
    grouped by the system the round measured first: {"16": {"a first": [...], "b first": [...]}}."""
    by_round: dict[int, dict[str, dict[int, float]]] = {}
    firsts: dict[int, str] = {}
    for r in rounds:
        if r["system"] in (a, b):
            firsts[r["round"]] = r.get("first", "")
            values = by_round.setdefault(r["round"], {}).setdefault(r["system"], {})
            for p in r.get(key) or []:
                if (p.get("client_procs") or 1) == 1:
                    values[p["concurrency"]] = p[field_]
    out: dict[str, dict[str, list[float]]] = {}
    for k in sorted(by_round):
        pa, pb = by_round[k].get(a, {}), by_round[k].get(b, {})
        for c in sorted(set(pa) & set(pb)):
            if pb[c]:
                out.setdefault(str(c), {}).setdefault(f"{firsts[k]} first", []).append(round(pa[c] / pb[c], 3))
    return out


def report(results: dict) -> None:
    """Ratios of output tokens/s, pooled per system over its rounds; the referee's beside them."""
    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    def per_round(name: str, key: str, field_: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for r in results["rounds"] or [{"system": n, **s} for n, s in results["systems"].items()]:
            if r["system"] == name:
                for p in r.get(key) or []:
                    n = p.get("client_procs") or 1
                    out.setdefault(str(p["concurrency"]) + (f"/{n}procs" if n > 1 else ""), []).append(p[field_])
        if not out and name == "offline" and key == "points":
            out = {str(p["concurrency"]): [p["output_tok_per_s"]] for p in results["systems"].get("offline", {}).get("points", [])}
        return out

    ratios: dict = {}
    for key, field_ in (("points", "output_tok_per_s"), ("referee", "output_throughput")):
        for a, b in [("fleet", "vllm"), ("fleet", "fleet-old"), ("fleet", "litellm"), ("fleet", "offline"), ("vllm", "offline"),
                     ("fleet", "engine"), ("vllm", "engine"), ("fleet-si", "offline"), ("fleet-si", "fleet"),
                     ("fleet-2r", "fleet"), ("fleet-2r", "vllm-dp"), ("vllm-dp", "vllm")]:
            ta, tb = per_round(a, key, field_), per_round(b, "points" if b in ENGINES else key,
                                                           "output_tok_per_s" if b in ENGINES else field_)
            both = {c: round(mean(ta[c]) / mean(tb[c]), 3) for c in ta if tb.get(c) and mean(tb[c])}
            if both:
                label = f"{a}/{b}" + (" (vllm bench serve)" if key == "referee" else "")
                ratios[label] = both
                print(f"{label} output tok/s:", both, flush=True)
    results["ratios"] = ratios
    for a, b, key, field_ in (("fleet", "vllm", "points", "output_tok_per_s"), ("fleet", "offline", "points", "output_tok_per_s"),
                              ("fleet", "vllm", "referee", "output_throughput"), ("fleet-si", "offline", "points", "output_tok_per_s"),
                              ("fleet-si", "fleet", "points", "output_tok_per_s"), ("fleet", "fleet-old", "points", "output_tok_per_s"),
                              ("fleet", "engine", "points", "output_tok_per_s"), ("vllm", "engine", "points", "output_tok_per_s"),
                              ("fleet-2r", "fleet", "points", "output_tok_per_s"), ("fleet-2r", "vllm-dp", "points", "output_tok_per_s"),
                              ("fleet-2r", "fleet", "referee", "output_throughput"),
                              ("fleet-2r", "vllm-dp", "referee", "output_throughput")):
        if paired := paired_ratios(results["rounds"], a, b, key, field_):
            label = f"{a}/{b} per round" + (" (vllm bench serve)" if key == "referee" else "")
            results.setdefault("paired", {})[label] = paired
            print(f"{label}, by the system measured first:", paired, flush=True)
    limits = {name: s.get("max_num_batched_tokens") for name, s in results["systems"].items() if s.get("max_num_batched_tokens")}
    if len(set(limits.values())) > 1:
        print(f"WARNING: the engines ran with different scheduler limits (tokens per step): {limits}", flush=True)


if __name__ == "__main__":
    main()
