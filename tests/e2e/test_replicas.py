"""Two replicas of the tiny model behind one name, real vLLM engines on the CPU through the real
launcher, talked to with the openai SDK (issue 18): both serve, the prefix policy keeps one prompt
on one replica (each engine's prefix-cache counters say so), a replica killed with SIGKILL costs no
request that had not started, an engine run with `fleet engine` joins and leaves, and a rolling
reload fails no request."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fleets import (
    ROOT,
    TINY,
    FleetProcess,
    Steady,
    fleet_toml,
    free_ports,
    running_fleet,
    status,
    wait_replicas,
    wait_until,
)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[FleetProcess]:
    model = {"name": "tiny", "source": str(tiny_model), "port": free_ports(2), "replicas": 2, "routing": "prefix", **TINY}
    with running_fleet([model], tmp_path_factory.mktemp("replicas"), ready_timeout=600) as fleet:
        wait_replicas(fleet, "ready", timeout=600)  # the model is ready with one replica; both, here
        yield fleet


def engine_requests(row: dict) -> int:
    """The replica's engine's own count of the requests it took."""
    return int(httpx.get(f"http://127.0.0.1:{row['port']}/stats", timeout=5).json()["requests"])


@pytest.fixture
def client(replicated: FleetProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=replicated.url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def ask(client: openai.OpenAI, prompt: str) -> str:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0).choices[0].text


def test_both_replicas_serve_and_the_model_is_listed_once(replicated: FleetProcess, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    rows = status(replicated)
    before = {name: engine_requests(row) for name, row in rows.items()}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: ask(client, f"Prompt number {i} says"), range(16)))
    served = {name: engine_requests(row) - before[name] for name, row in rows.items()}
    assert sum(served.values()) == 16 and min(served.values()) > 0, served  # different prompts spread


def test_prefix_policy_keeps_one_prompt_on_one_replica(replicated: FleetProcess, client: openai.OpenAI) -> None:
    rows = status(replicated)
    before = {name: engine_requests(row) for name, row in rows.items()}
    answers = {ask(client, "The same shared system prompt, and then") for _ in range(8)}
    assert len(answers) == 1  # greedy: one answer, from one replica's cache-warm engine
    served = sorted(engine_requests(row) - before[name] for name, row in rows.items())
    assert served == [0, 8]


def engine_stats(row: dict) -> dict[str, int]:
    """The replica's engine's own counts: requests, prompt tokens, prefix-cache hits (cached_tokens)."""
    return dict(httpx.get(f"http://127.0.0.1:{row['port']}/stats", timeout=5).json())


SYSTEM = "You are a careful assistant who answers in one short sentence. " * 6  # several KV blocks long


def test_prefix_policy_lands_a_shared_prefix_on_one_warm_prefix_cache(replicated: FleetProcess, client: openai.OpenAI) -> None:
    rows = status(replicated)
    before = {name: engine_stats(row) for name, row in rows.items()}
    for i in range(6):
        ask(client, f"{SYSTEM}Question {i}: what comes next?")
    after = {name: engine_stats(row) for name, row in rows.items()}
    took = {name: after[name]["requests"] - before[name]["requests"] for name in rows}
    cached = {name: after[name]["cached_tokens"] - before[name]["cached_tokens"] for name in rows}
    home = max(took, key=lambda n: took[n])
    assert sorted(took.values()) == [0, 6], took
    # the first request filled the cache; the five after it found the shared prefix there
    assert cached[home] >= 5 * 32, cached


def test_a_replica_killed_under_a_steady_stream_costs_no_request_that_had_not_started(replicated: FleetProcess) -> None:
    rows = wait_replicas(replicated, "ready", timeout=60)
    victim = "tiny.1"
    with Steady(replicated.url) as steady:
        wait_until(lambda: len(steady.results) >= 6, "the stream is going")
        killed_at = time.monotonic()
        os.kill(rows[victim]["pid"], signal.SIGKILL)
        wait_until(lambda: status(replicated)[victim]["state"] != "ready", "the gateway saw it die", timeout=30)
        wait_until(lambda: status(replicated)[victim]["state"] == "ready", "it restarted", timeout=300)
        rejoined = len(steady.results)
        wait_until(lambda: len(steady.results) >= rejoined + 6, "requests after it rejoined")
    assert steady.failed(began_after=killed_at) == [], steady.failed(began_after=killed_at)
    assert len(steady.results) > 20
    killed = rows[victim]["pid"]
    rows = status(replicated)
    assert rows[victim]["restarts"] == 1 and rows[victim]["pid"] not in (None, killed)
    before = engine_stats(rows[victim])["requests"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: ask_url(replicated.url, f"after the restart {i}"), range(12)))
    assert engine_stats(rows[victim])["requests"] > before  # back in rotation


def ask_url(url: str, prompt: str) -> str:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as sdk:
        return ask(sdk, prompt)


def test_an_engine_started_with_fleet_engine_serves_and_stopping_it_routes_around_it(
    tmp_path: Path, cache_dir: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_ENGINE_TOKEN", "e2e-shared-token")
    # two CPU engines on one machine: each on its own cores, as the launcher would bind two of its own
    # (unbound, their OpenMP threads spin against each other and a step takes seconds)
    cores = sorted(os.sched_getaffinity(0))
    mine, theirs = cores[:max(1, len(cores) // 2)], cores[len(cores) // 2:] or cores
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, mine)))
    own = free_ports(2)
    outside = own + 1
    model = {"name": "tiny", "source": str(tiny_model), **TINY,
             "placements": [{"port": own}, {"url": f"http://127.0.0.1:{outside}"}]}
    config = tmp_path / "fleet.toml"
    config.write_text(fleet_toml([model], free_ports(1)))
    log = (tmp_path / "engine.log").open("wb")
    engine = subprocess.Popen([str(ROOT / ".venv/bin/fleet"), "engine", "--config", str(config), "--model", "tiny"],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, theirs))})
    (tmp_path / "fleet").mkdir()
    try:
        with running_fleet([model], tmp_path / "fleet", ready_timeout=600) as fleet:
            rows = wait_replicas(fleet, "ready", timeout=600)
            assert rows["tiny.1"]["pid"] is None  # not the launcher's
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda i: ask_url(fleet.url, f"Prompt number {i} says"), range(12)))
            assert engine_stats({"port": outside})["requests"] > 0 and engine_stats({"port": own})["requests"] > 0
            with Steady(fleet.url) as steady:
                wait_until(lambda: len(steady.results) >= 6, "the stream is going")
                stopped_at = time.monotonic()
                engine.terminate()  # the engine drains and exits; the gateway routes around it
                engine.wait(60)
                wait_until(lambda: status(fleet)["tiny.1"]["state"] == "failed", "out of rotation", timeout=30)
                left = len(steady.results)
                wait_until(lambda: len(steady.results) >= left + 9, "requests once it is out of rotation")
            assert steady.failed(began_after=stopped_at) == []
            assert "out of rotation" in status(fleet)["tiny.1"]["reason"]
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
        log.close()
    assert "e2e-shared-token" not in (tmp_path / "engine.log").read_text(errors="replace")


def test_a_rolling_reload_under_a_steady_stream_fails_no_request(replicated: FleetProcess, tmp_path: Path) -> None:
    """Last in this module: it changes the shared fleet's settings."""
    rows = wait_replicas(replicated, "ready", timeout=300)
    config = next(Path(a) for a in replicated.proc.args if str(a).endswith(".toml"))  # type: ignore[union-attr]
    config.write_text(config.read_text().replace("max_model_len = 512", "max_model_len = 384"))
    assert "max_model_len = 384" in config.read_text()
    with Steady(replicated.url) as steady:
        wait_until(lambda: len(steady.results) >= 6, "the stream is going")
        out = subprocess.run([str(ROOT / ".venv/bin/fleet"), "reload", "--config", str(config)], capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stdout + out.stderr
    assert steady.failed() == [], steady.failed()
    after = status(replicated)
    assert all(after[n]["pid"] != rows[n]["pid"] for n in rows)  # both replaced
    assert all(after[n]["state"] == "ready" for n in rows)
    with openai.OpenAI(base_url=replicated.url + "/v1", api_key="x", max_retries=0) as sdk, \
            pytest.raises(openai.BadRequestError, match="384"):
        sdk.completions.create(model="tiny", prompt="hi", max_tokens=400)
