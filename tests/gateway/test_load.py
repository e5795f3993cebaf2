"""The gateway under load on loopback: many concurrent streams, admission control's 429s (a full
queue, a queue timeout), clients that leave, engines that die or go silent (504).

A fleet of fake engines (tests/fake_engine.py) runs in-process on free ports; the clients are
aiohttp (or raw asyncio sockets, to drop a connection at an exact point) in the test's own event
loop. Every load is bounded in count and in time. After each load the books must balance: the
gateway's in-flight counts (GET /fleet/status, `models[].inflight`) and each fake engine's
running count (GET /fake/stats) return to 0.

The last test is a short soak (bench/soak.py): a fleet in its own process under steady mixed load
for about a minute, its memory sampled; it must grow less than 5% after the warm-up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from fake_engine import expected_text
from fleets import FakeFleets, InProcessFleet, wait_until

from bench import soak  # bench/ is a package at the repository root (on sys.path: conftest.py)

CLIENTS = 500  # concurrent streaming clients
DROPPERS = 200  # clients that leave mid-generation, half streaming, half not
TOKENS = 5
MODELS: dict[str, dict[str, Any]] = {
    # short streams: 5 tokens, 10 ms apart
    "stream": {"engine_args": {"fake_token_delay": 0.01}},
    # 2 at the engine, 2 waiting, the rest refused at once: 429s on purpose
    "tight": {"engine_args": {"fake_token_delay": 0.05}, "limits": {"max_concurrent": 2, "max_queued": 2}},
    # 1 at the engine, and a waiter gives up after 0.3 s
    "queue": {"engine_args": {"fake_token_delay": 0.05}, "limits": {"max_concurrent": 1, "queue_timeout": 0.3}},
    # 60 tokens 100 ms apart (6 s) if left to finish: long enough to leave in the middle
    "slow": {"engine_args": {"fake_token_delay": 0.1}},
    # serves 30 requests (1 s each), then dies on the next one; the launcher restarts it
    "crashy": {"engine_args": {"fake_crash_after_requests": 30, "fake_token_delay": 0.05}},
}
ENGINE_TIMEOUT = 1.5  # [gateway] engine_timeout of a fleet of its own (a busy machine must not trip it elsewhere)


@pytest.fixture(scope="module", autouse=True)
def enough_file_descriptors() -> None:
    """Client, gateway and engine-client sockets of 500 streams live in this one process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets) -> InProcessFleet:
    return module_fake_fleet(*({"name": name, **spec} for name, spec in MODELS.items()))


@pytest.fixture(scope="module")
def stuck_fleet(module_fake_fleet: FakeFleets) -> InProcessFleet:
    """One model that sends its first token, then stays silent for 10 s; engine_timeout 1.5 s."""
    return module_fake_fleet({"name": "stuck", "engine_args": {"fake_token_delay": 10.0}},
                             gateway={"engine_timeout": ENGINE_TIMEOUT})


def engine_stats(fleet: InProcessFleet, name: str) -> dict[str, Any]:
    """The fake engine's own counters (GET /fake/stats on its port)."""
    return httpx.get(f"http://127.0.0.1:{fleet.config.model(name).port}/fake/stats", timeout=5).json()


def inflight(fleet: InProcessFleet) -> dict[str, int]:
    """The gateway's requests in flight per model, from GET /fleet/status (a loopback client)."""
    rows = httpx.get(f"{fleet.url}/fleet/status", timeout=5).json()["models"]
    return {row["model"]: row["inflight"] for row in rows}


def queued(fleet: InProcessFleet) -> dict[str, float]:
    """Requests waiting for an engine slot per model, from /metrics."""
    text = httpx.get(f"{fleet.url}/metrics", timeout=5).text
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("fleet_requests_queued{")}


def settle(fleet: InProcessFleet, names: list[str], timeout: float = 2.0) -> float:
    """Seconds until the gateway and the engines of `names` hold no request; fail at `timeout`."""
    started = time.monotonic()
    while True:
        gateway = inflight(fleet)
        engines = {name: engine_stats(fleet, name)["running"] for name in names}
        if not any(gateway.values()) and not any(engines.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"after {timeout}s still in flight: gateway {gateway}, engines {engines}")
        time.sleep(0.02)


def run(coro: Awaitable[Any], limit: float) -> Any:
    """Run one load in a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, limit))


def session(**kwargs: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=60, sock_connect=10),
        **kwargs,
    )


async def sse(resp: aiohttp.ClientResponse) -> list[str]:
    """The data fields of a whole event stream."""
    return [line[6:].decode().rstrip("\r\n") async for line in resp.content if line.startswith(b"data: ")]


# --- many concurrent streams -----------------------------------------------------------------------


def test_500_concurrent_streams_all_complete_and_the_books_balance(fleet: InProcessFleet) -> None:
    before = engine_stats(fleet, "stream")
    body = {"model": "stream", "prompt": "hi", "max_tokens": TOKENS, "stream": True}
    outcomes: collections.Counter[str] = collections.Counter()

    async def client(http: aiohttp.ClientSession, start: asyncio.Event) -> None:
        await start.wait()
        async with http.post(f"{fleet.url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                outcomes[f"HTTP {resp.status}: {(await resp.text())[:200]}"] += 1
                return
            data = await sse(resp)
        text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
        outcomes["ok" if data[-1] == "[DONE]" and text == expected_text(TOKENS) else f"bad stream: {data[-3:]}"] += 1

    async def load() -> float:
        start = asyncio.Event()
        async with session() as http:
            clients = [asyncio.create_task(client(http, start)) for _ in range(CLIENTS)]
            await asyncio.sleep(0)
            began = time.monotonic()
            start.set()  # all at once
            results = await asyncio.gather(*clients, return_exceptions=True)
        outcomes.update(f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException))
        return time.monotonic() - began

    took = run(load(), limit=60)
    assert outcomes == {"ok": CLIENTS}, outcomes.most_common(5)
    settle(fleet, list(MODELS))
    after = engine_stats(fleet, "stream")
    assert after["requests"] - before["requests"] == CLIENTS
    assert after["aborted"] == before["aborted"]
    print(f"{CLIENTS} streams of {TOKENS} tokens in {took:.2f}s")


# --- admission control: 429 with Retry-After on purpose ----------------------------------------------


def test_a_burst_beyond_concurrency_and_queue_gets_429s_with_retry_after_and_nothing_else(fleet: InProcessFleet) -> None:
    """max_concurrent 2 + max_queued 2: of 40 simultaneous requests 4 are served, 36 refused at once."""
    burst = 40
    peak = 0
    results: list[tuple[int, dict[str, str], str]] = []

    async def client(http: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "tight", "prompt": "hi", "max_tokens": 10, "stream": i % 2 == 0}
        async with http.post(f"{fleet.url}/v1/completions", json=body) as resp:
            results.append((resp.status, dict(resp.headers), await resp.text()))

    async def watch(stop: asyncio.Event) -> None:
        nonlocal peak
        port = fleet.config.model("tight").port
        async with session() as http:
            while not stop.is_set():
                async with http.get(f"http://127.0.0.1:{port}/fake/stats") as r:
                    peak = max(peak, (await r.json())["running"])
                await asyncio.sleep(0.01)

    async def load() -> None:
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        async with session() as http:
            await asyncio.gather(*(client(http, i) for i in range(burst)))
        stop.set()
        await watcher

    run(load(), limit=30)
    statuses = collections.Counter(status for status, _, _ in results)
    assert statuses == {200: 4, 429: burst - 4}, statuses  # all 40 arrive well within 0.5 s
    for status, headers, text in results:
        if status == 429:
            assert int(headers["Retry-After"]) >= 1, headers
            error = json.loads(text)["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded"), error
            assert "tight" in error["message"] and "capacity" in error["message"], error
        else:
            assert text.rstrip().endswith("[DONE]") or json.loads(text)["choices"], text[-200:]
    assert peak <= 2, f"the engine ran {peak} requests at once; max_concurrent is 2"
    settle(fleet, list(MODELS))
    assert queued(fleet)["tight"] == 0


def test_a_request_queued_longer_than_queue_timeout_gets_429_not_a_hang(fleet: InProcessFleet) -> None:
    """max_concurrent 1, queue_timeout 0.3 s: the refused request keeps no place in the queue and no slot."""
    async def load() -> tuple[tuple[int, str, float], tuple[int, str, float], float]:
        async with session() as http:
            async def one(delay: float, max_tokens: int) -> tuple[int, str, float]:
                await asyncio.sleep(delay)
                began = time.monotonic()
                body = {"model": "queue", "prompt": "hi", "max_tokens": max_tokens}
                async with http.post(f"{fleet.url}/v1/completions", json=body) as resp:
                    return resp.status, await resp.text(), time.monotonic() - began

            async def refused() -> tuple[tuple[int, str, float], float]:
                answer = await one(0.2, 2)
                return answer, (await asyncio.to_thread(queued, fleet))["queue"]  # the first still runs

            first, (second, left_queued) = await asyncio.gather(one(0, 40), refused())  # the first holds the only slot for 2 s
            return first, second, left_queued

    (first, _, _), (status, text, waited), left_queued = run(load(), limit=20)
    assert first == 200
    assert status == 429 and 0.25 <= waited < 1.5, (status, waited, text)
    assert "queued for" in json.loads(text)["error"]["message"]
    assert left_queued == 0
    settle(fleet, list(MODELS))
    r = httpx.post(f"{fleet.url}/v1/completions", json={"model": "queue", "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200, r.text  # the slot came back: the refused request did not keep it


# --- clients that leave mid-generation -------------------------------------------------------------


async def raw_request(fleet: InProcessFleet, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a connection and send one POST /v1/completions; the caller decides when to leave."""
    host, port = fleet.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    await writer.drain()
    return reader, writer


def reset(writer: asyncio.StreamWriter) -> None:
    """Leave at once with a TCP reset rather than a FIN, as a client that crashed or lost its network."""
    with contextlib.suppress(OSError):
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


@pytest.mark.parametrize("how", ["close", "reset"])
def test_200_clients_leaving_mid_generation_free_the_engine_within_two_seconds(fleet: InProcessFleet, how: str) -> None:
    """100 streaming clients (after their first token) and 100 waiting for a JSON answer leave at once."""
    before = engine_stats(fleet, "slow")
    body = {"model": "slow", "prompt": "hi", "max_tokens": 60}
    leave: Callable[[asyncio.StreamWriter], None] = reset if how == "reset" else asyncio.StreamWriter.close

    async def client(stream: bool, go: asyncio.Event) -> None:
        reader, writer = await raw_request(fleet, {**body, "stream": stream})
        if stream:  # headers, then the first token
            while not (line := await reader.readline()).startswith(b"data: "):
                assert line, "the gateway closed the stream"
        await go.wait()
        leave(writer)

    async def load() -> float:
        go = asyncio.Event()
        clients = [asyncio.create_task(client(i % 2 == 0, go)) for i in range(DROPPERS)]
        deadline = time.monotonic() + 5  # until all 200 are generating (6 s each if left alone)
        while (running := engine_stats(fleet, "slow")["running"]) < DROPPERS and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert running == DROPPERS
        go.set()
        await asyncio.gather(*clients)
        return time.monotonic()

    left_at = run(load(), limit=30)
    deadline = left_at + 2.0  # the engine stops working for them within 2 s
    while (running := engine_stats(fleet, "slow")["running"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert running == 0, f"the engine still runs {running} requests 2 s after their clients left"
    took = time.monotonic() - left_at
    settle(fleet, list(MODELS), timeout=5.0)  # and the gateway's books balance
    after = engine_stats(fleet, "slow")
    assert after["aborted"] - before["aborted"] == DROPPERS
    assert after["requests"] - before["requests"] == DROPPERS
    print(f"{DROPPERS} clients left ({how}); the engine idle {took:.2f}s later")


# --- engine faults under load -------------------------------------------------------------------------


def test_an_engine_dying_under_load_answers_every_client_and_comes_back(fleet: InProcessFleet) -> None:
    """30 requests in flight, then the engine dies: every client gets an answer, none hangs."""
    answers: list[tuple[bool, int, str]] = []

    async def client(http: aiohttp.ClientSession, stream: bool) -> None:
        body = {"model": "crashy", "prompt": "hi", "max_tokens": 20, "stream": stream}
        async with http.post(f"{fleet.url}/v1/completions", json=body) as resp:
            answers.append((stream, resp.status, await resp.text()))

    async def load() -> None:
        async with session() as http:
            first = [asyncio.create_task(client(http, i % 2 == 0)) for i in range(30)]
            deadline = time.monotonic() + 5
            while engine_stats(fleet, "crashy")["running"] < 30 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.gather(*first, *(client(http, i % 2 == 0) for i in range(30)))  # the 31st kills it

    run(load(), limit=30)
    statuses = collections.Counter(status for _, status, _ in answers)
    assert len(answers) == 60 and set(statuses) <= {200, 502, 503}, statuses
    assert statuses[502] + statuses[503] >= 1, statuses
    for stream, status, text in answers:
        if status == 200 and stream:  # a stream that had begun: it ends, maybe with an error event, in [DONE]
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", text[-300:]
            last = json.loads(events[-2])
            assert "error" not in last or last["error"]["code"] == "engine_error", last
        elif status == 200:  # finished before the engine died (a slow machine)
            assert json.loads(text)["choices"][0]["finish_reason"] == "length", text
        else:
            error = json.loads(text)["error"]
            assert error["code"] == ("engine_error" if status == 502 else "model_not_ready"), error
    assert not any(inflight(fleet).values())

    def restarts() -> int:
        return {row["model"]: row["restarts"] for row in httpx.get(f"{fleet.url}/fleet/status").json()["models"]}["crashy"]

    wait_until(lambda: restarts() == 1, "the crash was noticed and the engine restarted")  # not READY from before it
    assert fleet.wait_state("crashy", "ready", timeout=30) == "ready"
    r = httpx.post(f"{fleet.url}/v1/completions", json={"model": "crashy", "prompt": "hi", "max_tokens": 2}, timeout=10)
    assert r.status_code == 200, r.text
    assert restarts() == 1
    settle(fleet, list(MODELS))


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_silent_longer_than_engine_timeout_is_a_504_not_a_hang(stuck_fleet: InProcessFleet, stream: bool) -> None:
    fleet = stuck_fleet
    before = engine_stats(fleet, "stuck")
    started = time.monotonic()
    body = {"model": "stuck", "prompt": "hi", "max_tokens": 3, "stream": stream}
    r = httpx.post(f"{fleet.url}/v1/completions", json=body, timeout=30)
    took = time.monotonic() - started
    assert ENGINE_TIMEOUT <= took < ENGINE_TIMEOUT + 5, took  # the engine would stay silent for 10 s
    if stream:  # the first token went out; the timeout is an event, then [DONE]
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_timeout", events
    else:
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "engine_timeout"
    settle(fleet, ["stuck"])  # the gateway hung up, so the engine stopped waiting too
    assert engine_stats(fleet, "stuck")["aborted"] == before["aborted"] + 1


# --- a short soak: memory ----------------------------------------------------------------------------


@pytest.mark.slow
def test_short_soak_gateway_memory_grows_less_than_5_percent(tmp_path: Path) -> None:
    """36 s of steady mixed load on a fleet in its own process (bench/soak.py): after a 12 s
    warm-up, the median RSS of the last 8 s against the first 8 s. A full garbage collection
    runs before each sample, so the numbers follow live memory, not the collector's timing (the
    long soak is bench/soak.py's own run; this one keeps the suite inside CI's time)."""
    cfg = soak.SoakConfig(seconds=36, warmup=12, interval=1.0, concurrency=12, collect=True)
    report = soak.run_soak(cfg, tmp_path)
    print(soak.summary(report))
    assert report["unexpected"] == {}, report["unexpected"]
    assert report["requests_total"] > 1000, report["requests"]
    assert report["inflight_after"] == 0
    assert report["growth_pct"] < 5.0, soak.summary(report)
    assert report["measures"]["gc_objects"]["growth_pct"] < 5.0, soak.summary(report)  # no Python objects pile up
