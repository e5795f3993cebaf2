"""The benchmark harness runs end to end in a few seconds: `bench/run.py --quick` over the null engine.

No vLLM, no LiteLLM: fleet's real launcher and gateway over bench/null_engine.py, load from
bench/loadgen.py on loopback. Checks the shape of results.json (what docs/benchmarks.md is built
from), that the numbers are sane, and that every process the harness started is gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fleets import ROOT, wait_until

from bench import loadgen  # bench/ is a package at the repository root (on sys.path: conftest.py)
from bench.gpu import run_order, scheduler_tokens


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_run_writes_results(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--concurrency", "1,8",
         "--out", str(out), "--workdir", str(work), "--no-plots"],
        capture_output=True, text=True, timeout=80, check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert elapsed < 60, f"the quick run took {elapsed:.0f}s"

    results = json.loads((out / "results.json").read_text())
    assert set(results) >= {"meta", "systems", "throughput", "overhead", "targets", "failures"}
    assert results["failures"] == {}
    assert results["meta"]["mode"] == "quick"
    assert {"cpu", "cores", "usable_cores", "memory_gib", "fleet_commit"} <= set(results["meta"]["machine"])

    system = results["systems"]["fleet-null"]
    assert 0 < system["start_s"] <= system["ready_s"] < 30

    rows = results["overhead"]["fixed_rate"]["fleet-null"]
    assert [r["rate"] for r in rows] == [100.0, 500.0]
    for row in rows:
        assert {"gateway", "direct", "added_p50_ms", "added_p99_ms"} <= set(row)
        for side in (row["gateway"], row["direct"]):
            assert side["errors"] == 0 and side["ok"] == side["requests"] > 0
            assert set(side["latency_ms"]) == {"p50", "p90", "p99", "mean", "max"}
            assert len(side["latency_cdf_ms"]) == len(loadgen.CDF_POINTS)
        res = row["gateway"]["resources"]
        assert res["front_peak_rss_mb"] > 10 and res["front_cpu_s"] > 0

    sustained = results["overhead"]["sustained"]
    assert sustained["fleet-null"]["max_rate"] > 0
    assert sustained["null-engine (direct)"]["max_rate"] > 0

    points = results["throughput"]["instant"]["fleet-null"]
    assert [p["concurrency"] for p in points] == [1, 8]
    for p in points:
        assert p["errors"] == 0 and p["req_per_s"] > 0
        assert p["tokens_per_request"] == [16]  # the null engine answers exactly max_tokens
        assert p["ttft_ms"]["p50"] <= p["latency_ms"]["p50"]

    targets = {t["target"]: t for t in results["targets"]}
    assert targets["fleet gateway memory (peak RSS)"]["measured"] > 0
    assert targets["fleet gateway start"]["measured"] == system["start_s"]
    assert all(t["pass"] is None for name, t in targets.items() if "vllm" in name)  # not measured here

    report = (out / "results.md").read_text()
    assert "Gateway overhead with an instant upstream" in report and "| fleet gateway -> null engine | 500 |" in report

    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(work) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == [], f"processes left running: {leftovers}"


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_floor_compares_uvicorn_and_litestar_routes_with_a_raw_server_and_stops_them(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "floor.py"), "--rate", "100", "--requests", "100", "--runs", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=50, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert [line.split(" @ ")[0] for line in lines[:4]] == [
        "run 1 raw asyncio (stub_openai.py)", "run 1 uvicorn, bare ASGI app", "run 1 uvicorn + Litestar ASGI route",
        "run 1 uvicorn + Litestar typed route"]
    assert all(line.endswith("errors 0") for line in lines[:4]), lines
    assert lines[-1].startswith("median p50: raw ")
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "floor.py" in " ".join(p.info["cmdline"] or [])
                 and "--serve" in (p.info["cmdline"] or [])]
    assert leftovers == [], f"processes left running: {leftovers}"


@pytest.mark.slow
@pytest.mark.timeout(60)
@pytest.mark.parametrize("stream", [False, True])
def test_inprocess_measures_cpu_per_request_and_stops_its_null_engine(stream: bool) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inprocess.py"), "--requests", "50", *(["--stream"] if stream else [])],
        capture_output=True, text=True, timeout=50, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("gateway in-process: ") and "50 requests" in last, last
    assert float(last.split()[2]) > 0
    assert "m: stopped" in proc.stdout + proc.stderr
    port = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("null engine: port "))
    ours = f'"port":{port},'  # its model's JSON on its command line: another test's null engine is not this one's
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if "null_engine.py" in (line := " ".join(p.info["cmdline"] or [])) and ours in line]
    assert leftovers == [], f"processes left running: {leftovers}"


def test_gpu_bench_starts_the_systems_in_the_order_named() -> None:
    assert run_order(["vllm", "fleet"]) == ["vllm", "fleet"]
    assert run_order(["fleet", "vllm", "litellm", "offline"]) == ["fleet", "vllm", "offline"]
    assert run_order(["litellm", "fleet", "vllm"]) == ["vllm", "fleet"]  # LiteLLM sits in front of vllm serve
    assert run_order(["fleet", "engine", "vllm"]) == ["fleet", "engine", "vllm"]


def test_gpu_bench_divides_both_servers_by_the_engine_without_a_server() -> None:
    from bench.gpu import report

    def entry(system: str, k: int, first: str, tok: float) -> dict:
        return {"round": k, "system": system, "first": first, "points": [{"concurrency": 16, "output_tok_per_s": tok}]}

    results = {"systems": {}, "rounds": [entry("fleet", 1, "fleet", 90), entry("vllm", 1, "fleet", 80),
                                         entry("engine", 1, "fleet", 100), entry("engine", 2, "engine", 120),
                                         entry("vllm", 2, "engine", 90), entry("fleet", 2, "engine", 96)]}
    report(results)
    assert results["ratios"]["fleet/engine"] == {"16": 0.845}  # mean(90, 96) / mean(100, 120)
    assert results["ratios"]["vllm/engine"] == {"16": 0.773}
    assert results["paired"]["vllm/engine per round"] == {"16": {"fleet first": [0.8], "engine first": [0.75]}}


def test_gpu_bench_places_two_replicas_one_per_gpu_or_one_replica_over_both() -> None:
    import tomllib

    from bench.gpu import fleet_toml, parser
    from fleet.config.load import parse_config

    def replicas(argv: list[str], count: int = 1) -> list[tuple[list[int], int]]:
        ns = parser().parse_args(["--model", "/models/m", "--memory", "0.3", *argv])
        m = parse_config(tomllib.loads(fleet_toml(ns, 8300, count))).models[0]
        assert m.gpu_memory_utilization == 0.3
        return [(r.gpus, r.tensor_parallel_size) for r in m.replica_configs()]

    assert replicas(["--replica-gpus", "0,1"], count=2) == [([0], 1), ([1], 1)]
    assert replicas(["--tp", "2"]) == [([0, 1], 2)]
    assert replicas([]) == [([0], 1)]


def test_gpu_bench_sets_the_old_fleets_environment_from_key_value_pairs() -> None:
    from bench.gpu import assignments

    assert assignments("VLLM_WORKER_MULTIPROC_METHOD=spawn, A=b=c") == {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "A": "b=c"}
    assert assignments("") == {}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        assignments("spawn")


FRONT = """
import subprocess, sys, time
# each line in one write: the three children share the pipe
titled = "import os, setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); os.write(1, b'titled\\\\n'); time.sleep(60)"
helper = "import os, time; os.write(1, b'helper\\\\n'); time.sleep(60)"
gone = subprocess.Popen([sys.executable, "-c", "import os; os.write(1, b'gone\\\\n')"])  # never reaped: a zombie
children = [subprocess.Popen([sys.executable, "-c", code]) for code in (helper, titled)]
time.sleep(60)
"""


@pytest.mark.timeout(30)
def test_gpu_bench_finds_the_engine_core_by_the_title_vllm_gives_it_not_a_helper() -> None:
    """A spawned EngineCore shares no command line with its parent: its title tells it apart; a
    child that is a zombie (whose command line psutil cannot read) is passed over."""
    from bench.gpu import python_processes

    with subprocess.Popen([sys.executable, "-c", FRONT], stdout=subprocess.PIPE, text=True) as front:
        family = [psutil.Process(front.pid)]
        try:
            assert front.stdout is not None
            assert sorted(front.stdout.readline().strip() for _ in range(3)) == ["gone", "helper", "titled"]
            wait_until(lambda: any(c.status() == psutil.STATUS_ZOMBIE for c in family[0].children()), "a zombie child")
            family += family[0].children()
            titled = next(c.pid for c in family[1:]
                          if c.status() != psutil.STATUS_ZOMBIE and " ".join(c.cmdline()).strip() == "VLLM::EngineCore")
            assert python_processes(front.pid) == {"front": front.pid, "EngineCore": titled}
        finally:
            for p in family:
                p.kill()


def test_loadgen_refuses_non_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        loadgen.completion_target("http://example.com:8000", "m", ["hi"], 4, stream=False)


def test_percentiles() -> None:
    assert loadgen.percentile([], 50) is None
    assert loadgen.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert loadgen.percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_gpu_bench_records_the_scheduler_limit_each_engine_logged(tmp_path: Path) -> None:
    log = tmp_path / "vllm.log"
    log.write_bytes(b"(APIServer pid=744) INFO 11-26 08:02:14 [scheduler.py:252] Chunked prefill is enabled "
                    b"with max_num_batched_tokens=8192.\nINFO ... Running: 1 reqs\n")
    assert scheduler_tokens(log) == 8192
    log.write_bytes(b"INFO no scheduler line yet\n")
    assert scheduler_tokens(log) is None
    assert scheduler_tokens(tmp_path / "missing.log") is None


# --- counting tokens, not chunks ---------------------------------------------------------------

# One streamed answer of 10 tokens that a server behind on its reads sent as 4 merged chunks.
MERGED = [("Hel", 2), ("lo wor", 3), ("ld", 1), ("!!!!", 4)]


def _merged_events(how: str, final_usage: bool = True) -> list[dict]:
    events, so_far = [], 0
    for text, tokens in MERGED:
        so_far += tokens
        choice: dict = {"index": 0, "text": text, "finish_reason": None}
        event: dict = {"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": None}
        if how == "continuous_usage":
            event["usage"] = {"prompt_tokens": 5, "completion_tokens": so_far, "total_tokens": 5 + so_far}
        elif how == "logprobs":
            choice["logprobs"] = {"tokens": ["t"] * tokens, "token_logprobs": [-0.1] * tokens,
                                  "top_logprobs": None, "text_offset": [0] * tokens}
        events.append(event)
    if final_usage:
        events.append({"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 10,
                                                                 "total_tokens": 15}})
    return events


async def _serve_sse(events: list[dict], pause: float = 0.0):
    """An aiohttp server on loopback that streams `events` (then [DONE]) for every POST."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            if pause:
                await asyncio.sleep(pause)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("final_usage", [True, False])
@pytest.mark.parametrize("how", ["continuous_usage", "logprobs"])
def test_loadgen_counts_the_tokens_of_merged_chunks_not_the_chunks(how: str, final_usage: bool) -> None:
    async def main() -> tuple[loadgen.Sample, loadgen.Progress]:
        runner, base = await _serve_sse(_merged_events(how, final_usage))
        try:
            target = loadgen.completion_target(base, "m", ["hi"], 10, stream=True)
            progress = loadgen.Progress()
            async with loadgen._session(1) as session:
                sample = await loadgen.send(session, target, 10, 0, progress)
            return sample, progress
        finally:
            await runner.cleanup()

    sample, progress = asyncio.run(main())
    assert sample.ok, sample.error
    assert (progress.chunks, progress.tokens, sample.tokens) == (4, 10, 10)
    assert progress.counted_by == {how}


def test_loadgen_falls_back_to_one_token_per_chunk_and_says_so() -> None:
    events = _merged_events("plain")
    tokens = [loadgen.chunk_tokens(e, {}) for e in events[:-1]]
    assert tokens == [(1, "chunks")] * 4
    assert loadgen.chunk_tokens({"choices": [{"index": 0, "text": ""}]}, {}) == (0, "chunks")


def test_loadgen_keeps_one_running_count_per_choice() -> None:
    seen: dict[int, int] = {}
    def usage(index: int, so_far: int) -> dict:
        return {"choices": [{"index": index, "text": "x"}], "usage": {"completion_tokens": so_far}}
    counts = [loadgen.chunk_tokens(usage(i, n), seen)[0] for i, n in [(0, 2), (1, 3), (0, 5), (1, 4)]]
    assert counts == [2, 3, 3, 1]


def test_window_counts_tokens_received_inside_it_from_merged_chunks() -> None:
    async def main() -> loadgen.RunResult:
        runner, base = await _serve_sse(_merged_events("continuous_usage"), pause=0.02)
        try:
            target = loadgen.completion_target(base, "m", ["hi"], 10, stream=True)
            return await loadgen.closed_window(target, 4, 1.0, ramp=0.1)
        finally:
            await runner.cleanup()

    s = loadgen.summarize(asyncio.run(main()))
    assert s["counted_by"] == ["continuous_usage"]
    assert s["window_chunks"] > 0
    assert s["output_tokens"] > s["window_chunks"]  # 2.5 tokens per chunk on average, not one
    assert s["output_tok_per_s"] >= s["completed_tok_per_s"] > 0  # running requests count too
    assert s["tokens_per_request"] == [10]


def test_loadgen_counts_a_streamed_tool_call_by_usage_and_keeps_its_finish_reason() -> None:
    from bench.referee import TOOL_CHOICES, WEATHER

    pieces = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city": "Paris", '}},
              {"index": 0, "function": {"arguments": '"unit": "celsius"}'}}]
    events = [{"choices": [{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}],
               "usage": {"prompt_tokens": 9, "completion_tokens": 3 * (k + 1), "total_tokens": 9 + 3 * (k + 1)}}
              for k, piece in enumerate(pieces)]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}})
    events.append({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}})

    async def main() -> loadgen.RunResult:
        runner, base = await _serve_sse(events)
        try:
            target = loadgen.tool_call_target(base, "m", ["hi", "ho"], 32, WEATHER, TOOL_CHOICES["named"])
            assert json.loads(target.bodies[0])["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
            return await loadgen.closed_loop(target, 2, 4)
        finally:
            await runner.cleanup()

    run = asyncio.run(main())
    assert all(s.ttft is not None for s in run.samples)  # a tool call's first piece is its first token
    s = loadgen.summarize(run)
    assert s["ok"] == 4 and s["tokens_per_request"] == [9]
    assert s["finish_reasons"] == {"stop": 4}


def test_summary_counts_time_per_output_token_after_the_first_as_the_referee_does() -> None:
    samples = [loadgen.Sample(ok=True, latency=0.110, ttft=0.010, tokens=11),  # 100 ms for 10 tokens after the first
               loadgen.Sample(ok=True, latency=0.050, ttft=0.010, tokens=1),  # one token: no time per token
               loadgen.Sample(ok=False, error="x")]
    s = loadgen.summarize(loadgen.RunResult(samples, wall=1.0, offered=3, mode="closed"))
    assert s["tpot_ms"]["p50"] == pytest.approx(10.0)
    assert s["tpot_ms"]["max"] == pytest.approx(10.0)


def test_gpu_bench_reverses_the_order_every_round_and_pools_rounds_in_its_ratios() -> None:
    from bench.gpu import report, rounds_order

    assert rounds_order(["fleet", "vllm"], 3) == [["fleet", "vllm"], ["vllm", "fleet"], ["fleet", "vllm"]]

    def entry(system: str, k: int, tok: float, ref: float) -> dict:
        return {"round": k, "system": system, "points": [{"concurrency": 256, "output_tok_per_s": tok}],
                "referee": [{"concurrency": 256, "output_throughput": ref}]}

    results = {"systems": {"offline": {"points": [{"concurrency": 256, "output_tok_per_s": 100.0}]}},
               "rounds": [entry("fleet", 1, 90, 80), entry("vllm", 1, 60, 40), entry("vllm", 2, 40, 40),
                          entry("fleet", 2, 90, 80)]}
    report(results)
    assert results["ratios"]["fleet/vllm"] == {"256": 1.8}  # 90 / mean(60, 40)
    assert results["ratios"]["fleet/vllm (vllm bench serve)"] == {"256": 2.0}
    assert results["ratios"]["fleet/offline"] == {"256": 0.9}


def test_gpu_bench_pairs_each_rounds_ratio_by_the_system_measured_first() -> None:
    from bench.gpu import paired_ratios

    def entry(system: str, k: int, first: str, tok: dict[int, float]) -> dict:
        return {"round": k, "system": system, "first": first,
                "points": [{"concurrency": c, "output_tok_per_s": t} for c, t in tok.items()]}

    rounds = [entry("fleet", 1, "fleet", {1: 100, 16: 800}), entry("vllm", 1, "fleet", {1: 80, 16: 1000}),
              entry("vllm", 2, "vllm", {1: 100, 16: 800}), entry("fleet", 2, "vllm", {1: 110, 16: 800}),
              entry("fleet", 3, "fleet", {1: 90}), entry("vllm", 3, "fleet", {1: 100}),
              entry("offline", 1, "fleet", {1: 1})]
    assert paired_ratios(rounds, "fleet", "vllm") == {
        "1": {"fleet first": [1.25, 0.9], "vllm first": [1.1]},
        "16": {"fleet first": [0.8], "vllm first": [1.0]},
    }


def test_window_split_over_client_processes_adds_their_tokens() -> None:
    """Run in a child interpreter: a multiprocessing pool in the test process would leave it a
    resource tracker that later tests' process-group clean-ups kill."""
    import threading

    ready, box = threading.Event(), {}

    def serve() -> None:
        async def main() -> None:
            box["runner"], box["base"] = await _serve_sse(_merged_events("continuous_usage"), pause=0.02)
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            ready.set()
            await box["stop"].wait()
            await box["runner"].cleanup()
        asyncio.run(main())

    thread = threading.Thread(target=serve)
    thread.start()
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from bench import loadgen\n"
        "if __name__ == '__main__':\n"
        "    target = loadgen.completion_target(BASE, 'm', ['hi'], 10, stream=True)\n"
        "    run = loadgen.closed_window_procs(target, 4, 1.0, 2, ramp=0.1)\n"
        "    print(json.dumps({'summary': loadgen.summarize(run), 'cpu': run.extra['client_cpu_s'],"
        " 'concurrency': run.concurrency}))\n"
    )
    try:
        assert ready.wait(10)
        out = subprocess.run([sys.executable, "-c", script.replace("BASE", repr(box["base"]))],
                             capture_output=True, text=True, timeout=60)
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    s = result["summary"]
    assert len(result["cpu"]) == 2 and result["concurrency"] == 4
    assert s["output_tokens"] > s["window_chunks"] > 0 and s["tokens_per_request"] == [10]
    assert 0.9 < s["window_s"] < 1.5  # side by side: one window long, not two


def test_free_ports_come_from_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    """A port handed to a server that binds it only once its model is loaded must stay free meanwhile:
    outgoing connections and port-0 binds (vLLM's ZMQ ports) draw from the ephemeral range, so the
    ports come from below it (and above Ray's worker ports), each once."""
    from bench import procs

    low = procs._ephemeral_low()
    ports = [procs.free_port() for _ in range(200)]
    first = procs.free_ports(4)
    assert len(set(ports)) == len(ports) and not set(ports) & set(range(first, first + 4))
    assert all(procs.LOWEST_PORT <= p < low for p in [*ports, first + 3])


def test_merging_an_adapter_without_peft_gives_peft_merge_and_unloads_weights(tmp_path: Path) -> None:
    """bench/lora.py on a machine without PEFT merges with tiny_model.merge_adapter: the same tensors."""
    from safetensors.torch import load_file
    from tiny_model import merge_adapter, write_lora_adapter, write_merged_model, write_tiny_model

    base = write_tiny_model(tmp_path / "base")
    adapter = write_lora_adapter(base, tmp_path / "adapter", seed=3)
    ours = load_file(merge_adapter(base, adapter, tmp_path / "ours") / "model.safetensors")
    peft = load_file(write_merged_model(base, adapter, tmp_path / "peft") / "model.safetensors")
    original = load_file(base / "model.safetensors")
    changed = [k for k in ours if not ours[k].equal(original[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    assert all(ours[k].allclose(peft[k], atol=1e-6) for k in peft)
    assert (tmp_path / "ours" / "tokenizer.json").exists()


def test_truncation_bench_cuts_a_long_conversation_to_the_context(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import truncation

    truncation.main(["--tokenizer", str(tiny_model), "--exchanges", "40", "--context", "4096", "--repeat", "1"])
    [line] = capsys.readouterr().out.splitlines()
    whole, kept = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) tokens", line))
    exchange = whole / 40  # about
    assert whole > 4096 >= kept + 64 > 4096 - 1.2 * exchange  # cut to fit, and no whole exchange more than needed
