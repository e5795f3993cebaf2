"""Soak: a fleet in its own process under steady mixed load, its memory sampled over time.

    python bench/soak.py                       # 10 minutes on fake engines (tests/fake_engine.py)
    python bench/soak.py --minutes 60 --concurrency 32
    python bench/soak.py --real                # the packaged default model on vLLM (CPU or GPU)
    python bench/soak.py --collect             # a full garbage collection before each sample
    python bench/soak.py serve --config F ...  # internal: the fleet process under test

The fleet runs as `fleet.run.launcher.Fleet` in a process of its own (the `serve` subcommand: what
`fleet launch` runs, with the fake engine command unless --real), so the process measured holds
the gateway and the launcher and nothing else: engines are child processes, not counted, and the
load generator is this process.

Load: `--concurrency` workers, each sending its next request when the previous one ends, a fixed
mix of every path a request can take: completions and chat, JSON and streamed (with usage), a
client that leaves after the first token, a 400 (wrong type), a 404 (unknown model), and - on
fake engines - a model with max_concurrent 2 and no queue, for 429s. Every other outcome (a 5xx,
a transport error, a status the kind does not expect) is counted in `unexpected`.

Memory: every `--interval` seconds the fleet process records its RSS, open file descriptors,
live pymalloc blocks and objects tracked by the garbage collector, frozen ones included (the last
two tell a leak of Python objects from the allocator keeping memory it freed). The first `--warmup` seconds are left
out (pools, caches and allocator arenas fill up to the load's high-water mark). Growth = the
median of the last window against the median of the first window after the warm-up, a window
being a minute, or a third of the measured time when that is shorter. Target: RSS growth < 5%.
The least-squares slope after the warm-up (MiB per minute) is reported too.

Without --collect the process runs as `fleet launch` does: its start-up heap frozen
(fleet.process.freeze_startup_heap), so the cyclic garbage Litestar leaves on every cancelled
stream and every 400 is collected in small, frequent passes. With --collect a full collection
runs before each sample: the numbers then follow live memory only, the steadier signal for a
leak (the short soak in tests/gateway/test_load.py uses it).

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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make `fleet` and `bench` importable
    sys.path.insert(0, str(ROOT))

import aiohttp
import psutil

from bench.procs import Server, free_port
from fleet.cli import run_loop

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
    collect: bool = False
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


async def load(url: str, cfg: SoakConfig) -> dict[str, Any]:
    """Run the mix for cfg.seconds; return the counts and when it started (time.monotonic)."""
    mix = kinds(cfg.real)
    names = [k[0] for k in mix]
    weights = [k[1] for k in mix]
    by_name = {k[0]: k for k in mix}
    counts: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in names}
    unexpected: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    deadline = started + cfg.seconds
    rng = random.Random(0)

    async def worker(http: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            _, _, expected, request = by_name[name]
            try:
                outcome: int | str = await request(http, url)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                outcome = type(e).__name__
            counts[name][str(outcome)] += 1
            if outcome not in expected:
                unexpected[f"{name}: {outcome}"] += 1

    timeout = aiohttp.ClientTimeout(total=300 if cfg.real else 60, sock_connect=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=cfg.concurrency), timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(cfg.concurrency)))
    elapsed = time.monotonic() - started
    total = sum(sum(c.values()) for c in counts.values())
    return {
        "started": started,
        "requests": {name: dict(c) for name, c in counts.items()},
        "requests_total": total,
        "requests_per_s": round(total / elapsed, 1),
        "unexpected": dict(unexpected),
    }


# --- measuring ----------------------------------------------------------------------------------

Sample = tuple[float, float, int, int, int]  # seconds into the load, RSS MiB, fds, pymalloc blocks, gc objects
FIELDS = {"rss_mib": 1, "fds": 2, "blocks": 3, "gc_objects": 4}


def read_samples(path: Path, started: float, seconds: float) -> list[Sample]:
    """The fleet process's samples taken during the load, timed from its start."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(round(t - started, 2), *rest) for t, *rest in rows if started <= t <= started + seconds + 1]


def growth(samples: list[Sample], cfg: SoakConfig) -> dict[str, Any]:
    """Median of the last window against the first window after warm-up, for each measure; RSS slope."""
    measured = [s for s in samples if s[0] >= cfg.warmup]
    first = [s for s in measured if s[0] < cfg.warmup + cfg.window]
    last = [s for s in measured if s[0] >= cfg.seconds - cfg.window]
    if len(measured) < 4 or not first or not last:
        raise RuntimeError(f"too few samples after the warm-up: {len(measured)}")
    out: dict[str, Any] = {}
    for name, i in FIELDS.items():
        a, b = statistics.median(s[i] for s in first), statistics.median(s[i] for s in last)
        out[name] = {"after_warmup": round(a, 2), "at_end": round(b, 2), "growth_pct": round((b - a) / a * 100, 2),
                     "min": min(s[i] for s in measured), "max": max(s[i] for s in measured)}
    ts = [s[0] for s in measured]
    slope = statistics.linear_regression(ts, [s[1] for s in measured]).slope * 60 if len(set(ts)) > 1 else 0.0
    return {
        "growth_pct": out["rss_mib"]["growth_pct"],
        "slope_mib_per_min": round(slope, 3),
        "rss_at_start_mib": round(samples[0][1], 2),
        "peak_rss_mib": round(max(s[1] for s in samples), 2),
        "measures": out,
    }


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
    stats = workdir / "samples.jsonl"
    stats.unlink(missing_ok=True)
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, str(Path(__file__).resolve()), "serve", "--config", str(config),
            "--engine", "vllm" if cfg.real else "fake", "--samples", str(stats), "--interval", str(cfg.interval)]
    server = Server("fleet", argv + (["--collect"] if cfg.collect else []), workdir / "fleet.log", cwd=ROOT)
    server.start()
    try:
        ready_s = asyncio.run(wait_ready(url, server, cfg.ready_timeout if cfg.real else 60))
        result = asyncio.run(load(url, cfg))
        inflight_after = asyncio.run(settled_inflight(url))
        alive = server.alive()
        stop_gracefully(server)
    finally:
        server.stop()  # whatever is left (a no-op after a clean stop)
    samples = read_samples(stats, result.pop("started"), cfg.seconds)
    report = {
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine": "vllm (default model)" if cfg.real else "fake (tests/fake_engine.py)",
        "config": {**asdict(cfg), "window": cfg.window},
        "machine": {"cpus": psutil.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
                    "python": sys.version.split()[0]},
        "ready_s": round(ready_s, 1),
        **result,
        "inflight_after": inflight_after,
        "fleet_alive_at_end": alive,
        "target_pct": TARGET_PCT,
        **growth(samples, cfg),
        "samples": {"columns": ["s", *FIELDS], "rows": [list(s) for s in samples]},
    }
    report["pass"] = bool(report["growth_pct"] < TARGET_PCT and not report["unexpected"] and inflight_after == 0 and alive)
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    m = report["measures"]
    cfg = report["config"]
    return (
        f"soak on {report['engine']}{' (full collection before each sample)' if cfg['collect'] else ''}: "
        f"{cfg['seconds']:.0f}s, {report['requests_total']} requests ({report['requests_per_s']}/s), "
        f"unexpected {report['unexpected'] or 'none'}, in flight after {report['inflight_after']}\n"
        f"RSS of the fleet process: {report['rss_at_start_mib']} MiB at start, {m['rss_mib']['after_warmup']} MiB "
        f"after the {cfg['warmup']:.0f}s warm-up, {m['rss_mib']['at_end']} MiB at the end: growth "
        f"{report['growth_pct']:+.2f}% (target < {report['target_pct']}%), slope {report['slope_mib_per_min']:+.3f} MiB/min, "
        f"peak {report['peak_rss_mib']} MiB; {'PASS' if report['pass'] else 'FAIL'}\n"
        f"same windows: live pymalloc blocks {m['blocks']['growth_pct']:+.2f}%, gc-tracked objects "
        f"{m['gc_objects']['growth_pct']:+.2f}% ({m['gc_objects']['min']}-{m['gc_objects']['max']}), "
        f"open fds {m['fds']['min']}-{m['fds']['max']}"
    )


# --- the fleet process ----------------------------------------------------------------------------


async def sample_self(path: Path, interval: float, collect: bool) -> None:
    """Append [monotonic time, RSS MiB, fds, pymalloc blocks, gc objects] to `path` every `interval` s.

    time.monotonic() is the system's CLOCK_MONOTONIC, the same clock in the soak's process.
    """
    me = psutil.Process()
    with path.open("a") as out:
        while True:
            if collect:
                gc.collect()
            row = [round(time.monotonic(), 3), round(me.memory_info().rss / MIB, 2), me.num_fds(),
                   sys.getallocatedblocks(), len(gc.get_objects()) + gc.get_freeze_count()]
            out.write(json.dumps(row) + "\n")
            out.flush()
            await asyncio.sleep(interval)


async def serve(config_path: Path, engine: str, samples: Path | None, interval: float, collect: bool) -> None:
    """`fleet launch` (fleet.run.foreground.launch) with the engine command of the soak, sampling itself."""
    from fleet.config.load import load_config
    from fleet.run.foreground import launch
    from fleet.run.local import engine_command

    if engine == "fake":
        sys.path.insert(0, str(ROOT / "tests"))
        from fake_engine import fake_command as command
    else:
        command = engine_command
    sampler = asyncio.create_task(sample_self(samples, interval, collect)) if samples else None
    try:
        await launch(load_config(config_path), echo_logs=False, command=command)
    finally:
        if sampler:
            sampler.cancel()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="soak.py serve")
        p.add_argument("--config", type=Path, required=True)
        p.add_argument("--engine", choices=["fake", "vllm"], default="fake")
        p.add_argument("--samples", type=Path, default=None, help="append this process's samples to this file")
        p.add_argument("--interval", type=float, default=5.0)
        p.add_argument("--collect", action="store_true")
        ns = p.parse_args(argv[1:])
        run_loop(serve(ns.config, ns.engine, ns.samples, ns.interval, ns.collect))  # as `fleet launch`
        return 0
    parser = argparse.ArgumentParser(prog="soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds left out at the start (default: 60, or a sixth of a shorter run)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between two samples (default 5)")
    parser.add_argument("--concurrency", type=int, default=None, help="concurrent clients (default 16; 4 with --real)")
    parser.add_argument("--real", action="store_true", help="the packaged default model on vLLM instead of fake engines")
    parser.add_argument("--collect", action="store_true", help="a full garbage collection before each sample")
    parser.add_argument("--ready-timeout", type=float, default=900.0, help="seconds the real model may take to load")
    parser.add_argument("--out", type=Path, default=None, help="the JSON report (default bench/results/soak-<UTC>.json)")
    parser.add_argument("--workdir", type=Path, default=None, help="fleet file, log and samples (default: beside --out)")
    ns = parser.parse_args(argv)
    seconds = ns.minutes * 60
    cfg = SoakConfig(
        seconds=seconds,
        warmup=ns.warmup if ns.warmup is not None else min(60.0, seconds / 6),
        interval=ns.interval,
        concurrency=ns.concurrency or (4 if ns.real else 16),
        real=ns.real,
        collect=ns.collect,
        ready_timeout=ns.ready_timeout,
    )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ns.out or ROOT / "bench" / "results" / f"soak-{stamp}.json"
    report = run_soak(cfg, ns.workdir or out.with_suffix(""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    print(f"report: {out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
