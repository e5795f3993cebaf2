"""Soak: a fleet in its own process under steady mixed load, its memory sampled over time.

    python bench/soak.py                       # 10 minutes on fake engines (tests/fake_engine.py)
    python bench/soak.py --minutes 60 --concurrency 32
    python bench/soak.py --real                # the packaged default model on vLLM (CPU or GPU)
    python bench/soak.py serve --config F --engine fake|vllm    # internal: the fleet under test

The fleet runs as `fleet.launcher.Fleet` in a process of its own (the `serve` subcommand: what
`fleet launch` runs, with the fake engine command unless --real), so the process measured holds
the gateway and the launcher and nothing else: engines are child processes, not counted, and the
load generator is this process.

Load: `--concurrency` workers, each sending its next request when the previous one ends, a fixed
mix of every path a request can take: completions and chat, JSON and streamed (with usage), a
client that leaves after the first token, a 400 (wrong type), a 404 (unknown model), and - on
fake engines - a model with max_concurrent 2 and no queue, for 429s. Every other outcome (a 5xx,
a transport error, a status the kind does not expect) is counted in `unexpected`.

Memory: the RSS of the fleet process every `--interval` seconds. The first `--warmup` seconds
are left out (allocator arenas, caches and pools fill up); growth is the median RSS of the last
window against the median of the first window after the warm-up, a window being a minute, or a
third of the measured time when that is shorter. Target: growth < 5%. The least-squares slope
(MiB per minute after warm-up) and the open file descriptors (socket leaks) are reported too.

The report goes to bench/results/soak-<UTC time>.json (or --out) and is summed up on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import json
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `fleet` and `bench` importable
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402

from bench.procs import Server, free_port  # noqa: E402

TARGET_PCT = 5.0
MIB = 1 << 20


@dataclass
class SoakConfig:
    """One soak run."""

    seconds: float = 600.0
    warmup: float = 60.0
    interval: float = 5.0
    concurrency: int = 16
    real: bool = False
    ready_timeout: float = 900.0

    @property
    def window(self) -> float:
        """Seconds of samples each end of the comparison takes."""
        return min(60.0, (self.seconds - self.warmup) / 3)


def fleet_toml(cfg: SoakConfig, port: int) -> str:
    """The fleet under test: fake engines (one model with 429s on purpose), or the default model."""
    models: list[str] = []
    if cfg.real:
        models.append(f'[[models]]\nname = "soak"\nsource = "default"\nport = {free_port()}\nmax_model_len = 2048\n')
    else:
        models.append(f'[[models]]\nname = "soak"\nsource = "fake"\nport = {free_port()}\n'
                      'engine_args = { fake_token_delay = 0.002, fake_max_model_len = 256 }\n')
        models.append(f'[[models]]\nname = "tight"\nsource = "fake"\nport = {free_port()}\n'
                      'engine_args = { fake_token_delay = 0.005 }\n'
                      'limits = { max_concurrent = 2, max_queued = 0 }\n')
    return f'[gateway]\nhost = "127.0.0.1"\nport = {port}\n\n' + "\n".join(models)


# --- the load ------------------------------------------------------------------------------------

Kind = Callable[[aiohttp.ClientSession, str], Any]


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> int:
    async with http.post(url, json=body) as resp:
        await resp.read()
        return resp.status


async def _stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], *, leave: bool = False) -> int | str:
    async with http.post(url, json={**body, "stream": True}) as resp:
        if resp.status != 200:
            await resp.read()
            return resp.status
        async for line in resp.content:
            if leave and line.startswith(b"data: "):
                resp.close()  # drop the connection after the first event
                return "left"
            if line.startswith(b"data: [DONE]"):
                return 200
        return "cut short"


def kinds(real: bool) -> list[tuple[str, int, set[int | str], Kind]]:
    """(name, weight, expected outcomes, request) for every kind of request in the mix."""
    words = " ".join(["soak"] * 8)
    tokens = 16
    completion = {"model": "soak", "prompt": words, "max_tokens": tokens}
    chat = {"model": "soak", "messages": [{"role": "user", "content": words}], "max_tokens": tokens}
    mix: list[tuple[str, int, set[int | str], Kind]] = [
        ("completion", 25, {200}, lambda h, u: _post(h, f"{u}/v1/completions", completion)),
        ("completion_stream", 20, {200}, lambda h, u: _stream(
            h, f"{u}/v1/completions", {**completion, "stream_options": {"include_usage": True}})),
        ("chat_stream", 20, {200}, lambda h, u: _stream(h, f"{u}/v1/chat/completions", chat)),
        ("chat", 10, {200}, lambda h, u: _post(h, f"{u}/v1/chat/completions", chat)),
        ("leave_mid_stream", 8, {"left"}, lambda h, u: _stream(h, f"{u}/v1/completions", completion, leave=True)),
        ("bad_type_400", 5, {400}, lambda h, u: _post(h, f"{u}/v1/completions", {**completion, "max_tokens": "x"})),
        ("unknown_model_404", 4, {404}, lambda h, u: _post(h, f"{u}/v1/completions", {**completion, "model": "nope"})),
    ]
    if not real:
        mix.append(("tight_429", 8, {200, 429}, lambda h, u: _post(h, f"{u}/v1/completions", {**completion, "model": "tight"})))
    return mix


async def load(url: str, cfg: SoakConfig, pid: int) -> dict[str, Any]:
    """Run the mix for cfg.seconds while sampling the fleet process; return counts and samples."""
    mix = kinds(cfg.real)
    names = [k[0] for k in mix]
    weights = [k[1] for k in mix]
    by_name = {k[0]: k for k in mix}
    counts: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in names}
    unexpected: collections.Counter[str] = collections.Counter()
    proc = psutil.Process(pid)
    samples: list[tuple[float, float, int]] = []  # (seconds, RSS MiB, open fds)
    started = time.monotonic()
    deadline = started + cfg.seconds
    rng = random.Random(0)

    async def sample() -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                samples.append((round(time.monotonic() - started, 2), proc.memory_info().rss / MIB, proc.num_fds()))
            await asyncio.sleep(cfg.interval)

    async def worker(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            _, _, expected, request = by_name[name]
            try:
                outcome: int | str = await request(http, url)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                outcome = type(e).__name__
            counts[name][str(outcome)] += 1
            if outcome not in expected:
                unexpected[f"{name}: {outcome}"] += 1

    timeout = aiohttp.ClientTimeout(total=300 if cfg.real else 60, sock_connect=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.concurrency), timeout=timeout) as http:
        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(worker(http) for _ in range(cfg.concurrency)))
        await sampler
    elapsed = time.monotonic() - started
    total = sum(sum(c.values()) for c in counts.values())
    return {
        "started": started,
        "requests": {name: dict(c) for name, c in counts.items()},
        "requests_total": total,
        "requests_per_s": round(total / elapsed, 1),
        "unexpected": dict(unexpected),
        "samples": samples,
    }


# --- measuring ----------------------------------------------------------------------------------


def growth(samples: list[tuple[float, float, int]], cfg: SoakConfig) -> dict[str, Any]:
    """Median RSS of the last window against the first window after warm-up; slope after warm-up."""
    measured = [(t, rss) for t, rss, _ in samples if t >= cfg.warmup]
    if len(measured) < 4:
        raise RuntimeError(f"too few samples after the warm-up: {len(measured)}")
    first = [rss for t, rss in measured if t < cfg.warmup + cfg.window]
    last = [rss for t, rss in measured if t >= cfg.seconds - cfg.window]
    baseline, final = statistics.median(first), statistics.median(last)
    ts, rs = [t for t, _ in measured], [rss for _, rss in measured]
    slope = statistics.linear_regression(ts, rs).slope * 60 if len(set(ts)) > 1 else 0.0
    fds = [n for t, _, n in samples if t >= cfg.warmup]
    return {
        "baseline_rss_mib": round(baseline, 2),
        "final_rss_mib": round(final, 2),
        "growth_pct": round((final - baseline) / baseline * 100, 2),
        "slope_mib_per_min": round(slope, 3),
        "rss_at_start_mib": round(samples[0][1], 2),
        "peak_rss_mib": round(max(rss for _, rss, _ in samples), 2),
        "fds_after_warmup_min_max": [min(fds), max(fds)],
    }


def heap_growth(heap: list[tuple[float, int, int]], cfg: SoakConfig) -> dict[str, Any]:
    """The same comparison for live pymalloc blocks and gc-tracked objects (Python-level leaks)."""
    first = [h for h in heap if cfg.warmup <= h[0] < cfg.warmup + cfg.window]
    last = [h for h in heap if h[0] >= cfg.seconds - cfg.window]
    if not first or not last:
        return {}
    out: dict[str, Any] = {}
    for i, name in ((1, "blocks"), (2, "gc_objects")):
        a, b = statistics.median(h[i] for h in first), statistics.median(h[i] for h in last)
        out[f"{name}_after_warmup"], out[f"{name}_at_end"] = int(a), int(b)
        out[f"{name}_growth_pct"] = round((b - a) / a * 100, 2)
    return out


async def settled_inflight(url: str, timeout: float = 15.0) -> int:
    """Requests still in flight at the gateway once the load stopped (polled until 0 or timeout)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            async with http.get(f"{url}/fleet/status") as r:
                total = sum(row["inflight"] for row in (await r.json())["models"])
            if total == 0 or time.monotonic() > deadline:
                return total
            await asyncio.sleep(0.1)


async def wait_ready(url: str, server: Server, timeout: float) -> float:
    """Seconds until every model of the fleet is ready."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"the fleet exited:\n{server.tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with http.get(f"{url}/health") as r:
                    states = (await r.json())["models"]
                    if "failed" in states.values():
                        raise RuntimeError(f"an engine failed: {states}\n{server.tail()}")
                    if states and all(s == "ready" for s in states.values()):
                        return time.monotonic() - server.started_at
            await asyncio.sleep(0.2)
    raise RuntimeError(f"the fleet was not ready after {timeout:.0f}s:\n{server.tail()}")


def stop_gracefully(server: Server, timeout: float = 60.0) -> None:
    """SIGTERM to the launcher alone, as Ctrl-C: it drains, then stops its engines in order."""
    if server.proc is not None and server.alive():
        server.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.proc.wait(timeout)


def run_soak(cfg: SoakConfig, workdir: Path) -> dict[str, Any]:
    """Start the fleet in its own process, soak it, stop it; the report."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = workdir / "fleet.toml"
    config.write_text(fleet_toml(cfg, port))
    url = f"http://127.0.0.1:{port}"
    stats = workdir / "heap.jsonl"
    stats.unlink(missing_ok=True)
    server = Server("fleet", [sys.executable, str(Path(__file__).resolve()), "serve", "--config", str(config),
                              "--engine", "vllm" if cfg.real else "fake", "--stats", str(stats),
                              "--interval", str(cfg.interval)], workdir / "fleet.log", cwd=ROOT)
    server.start()
    try:
        ready_s = asyncio.run(wait_ready(url, server, cfg.ready_timeout if cfg.real else 60))
        result = asyncio.run(load(url, cfg, server.pid))
        inflight_after = asyncio.run(settled_inflight(url))
        alive = server.alive()
        stop_gracefully(server)
    finally:
        server.stop()  # whatever is left (a no-op after a clean stop)
    samples = result.pop("samples")
    offset = result.pop("started") - server.started_at  # the heap sampler's clock starts with the process
    heap = [(round(t - offset, 2), blocks, objects) for t, blocks, objects in
            (json.loads(line) for line in stats.read_text().splitlines() if line.strip()) if t >= offset]
    report = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engine": "vllm (default model)" if cfg.real else "fake (tests/fake_engine.py)",
        "config": {**asdict(cfg), "window": cfg.window},
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1)},
        "ready_s": round(ready_s, 1),
        **result,
        "inflight_after": inflight_after,
        "fleet_alive_at_end": alive,
        **growth(samples, cfg),
        "target_pct": TARGET_PCT,
        **heap_growth(heap, cfg),
        "rss_mib": [[t, round(rss, 2)] for t, rss, _ in samples],
        "fds": [[t, n] for t, _, n in samples],
        "heap": [list(h) for h in heap],
    }
    report["pass"] = bool(report["growth_pct"] < TARGET_PCT and not report["unexpected"] and inflight_after == 0 and alive)
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    return (
        f"soak on {report['engine']}: {report['config']['seconds']:.0f}s, {report['requests_total']} requests "
        f"({report['requests_per_s']}/s), unexpected {report['unexpected'] or 'none'}, in flight after {report['inflight_after']}\n"
        f"RSS of the fleet process: {report['rss_at_start_mib']} MiB at start, {report['baseline_rss_mib']} MiB after warm-up, "
        f"{report['final_rss_mib']} MiB at the end: growth {report['growth_pct']:+.2f}% (target < {report['target_pct']}%), "
        f"slope {report['slope_mib_per_min']:+.3f} MiB/min, peak {report['peak_rss_mib']} MiB, "
        f"open fds {report['fds_after_warmup_min_max']}; {'PASS' if report['pass'] else 'FAIL'}\n"
        f"Python heap over the same windows: live blocks {report.get('blocks_growth_pct', '?'):+}%, "
        f"gc-tracked objects {report.get('gc_objects_growth_pct', '?'):+}%"
    )


# --- the fleet process ----------------------------------------------------------------------------


async def heap_stats(path: Path, interval: float) -> None:
    """Append the interpreter's own counts to `path` every `interval` s (read back by the soak).

    RSS alone cannot tell a leak of Python objects from the allocator keeping freed memory: live
    pymalloc blocks and objects tracked by the garbage collector can. Cheap: no tracemalloc.
    """
    started = time.monotonic()
    with path.open("a") as out:
        while True:
            out.write(json.dumps([round(time.monotonic() - started, 2), sys.getallocatedblocks(), len(gc.get_objects())]) + "\n")
            out.flush()
            await asyncio.sleep(interval)


async def serve(config_path: Path, engine: str, stats: Path | None = None, interval: float = 5.0) -> None:
    """`fleet launch` with the engine command of the soak: stops on SIGINT/SIGTERM."""
    from fleet.config import load_config
    from fleet.launcher import Fleet, engine_command

    if engine == "fake":
        sys.path.insert(0, str(ROOT / "tests"))
        from fake_engine import fake_command as command
    else:
        command = engine_command
    fleet = Fleet(load_config(config_path), command=command, echo_logs=False)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, fleet.stop)
    sampler = asyncio.create_task(heap_stats(stats, interval)) if stats else None
    try:
        await fleet.run()
    finally:
        if sampler:
            sampler.cancel()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="soak.py serve")
        p.add_argument("--config", type=Path, required=True)
        p.add_argument("--engine", choices=["fake", "vllm"], default="fake")
        p.add_argument("--stats", type=Path, default=None, help="append heap counts to this file")
        p.add_argument("--interval", type=float, default=5.0)
        ns = p.parse_args(argv[1:])
        asyncio.run(serve(ns.config, ns.engine, ns.stats, ns.interval))
        return 0
    parser = argparse.ArgumentParser(prog="soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds left out at the start (default: 60, or a sixth of a shorter run)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between two RSS samples (default 5)")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 16; 4 with --real)")
    parser.add_argument("--real", action="store_true", help="the packaged default model on vLLM instead of fake engines")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds the real model may take to load")
    parser.add_argument("--out", type=Path, default=None, help="the JSON report (default bench/results/soak-<UTC>.json)")
    parser.add_argument("--workdir", type=Path, default=None, help="fleet file and log (default: next to the report)")
    ns = parser.parse_args(argv)
    seconds = ns.minutes * 60
    cfg = SoakConfig(
        seconds=seconds,
        warmup=ns.warmup if ns.warmup is not None else min(60.0, seconds / 6),
        interval=ns.interval,
        concurrency=ns.concurrency or (4 if ns.real else 16),
        real=ns.real,
        ready_timeout=ns.ready_timeout,
    )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = ns.out or ROOT / "bench" / "results" / f"soak-{stamp}.json"
    workdir = ns.workdir or out.with_suffix("")
    report = run_soak(cfg, workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"report: {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
