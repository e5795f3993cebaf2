"""Models started on demand and stopped when idle (fleet/run/demand.py, the owner's IDLE state),
through the real launcher and gateway, with fake engines (real processes) and the openai SDK."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from fake_engine import expected_text
from fleets import FAST, FakeFleets, InProcessFleet

ON_DEMAND = {"start": "on_demand"}
IDLE_STOP = {"when_idle": "stop", "idle_after": 0.5}


def sdk(fleet: InProcessFleet, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def engine_pid(fleet: InProcessFleet, name: str) -> int | None:
    return fleet.fleet.owners[name].pid


def demand(fleet: InProcessFleet, model: str) -> Any:
    return fleet.fleet.models[model].demand


def test_a_model_started_on_demand_waits_idle_and_shows_it(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "cold", **ON_DEMAND}, ready=())
    assert fleet.wait_state("cold", "idle") == "idle"
    assert engine_pid(fleet, "cold") is None  # no engine process until a request comes
    cards = httpx.get(f"{fleet.url}/v1/models", timeout=5).json()["data"]
    assert [(c["id"], c["state"]) for c in cards] == [("cold", "idle")]
    assert httpx.get(f"{fleet.url}/health", timeout=5).json()["models"] == {"cold": "idle"}


def test_concurrent_requests_to_a_cold_model_start_it_once_and_all_succeed(
    fake_fleet: FakeFleets, tmp_path: Path,
) -> None:
    hold = tmp_path / "hold"
    hold.touch()  # the engine is not ready until all twenty wait
    fleet = fake_fleet({"name": "cold", **ON_DEMAND, "engine_args": {"fake_hold_start_while": str(hold)}}, ready=())
    fleet.wait_state("cold", "idle")
    transitions = fleet.transitions("cold")
    with sdk(fleet) as client, concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(client.completions.create, model="cold", prompt="hi", max_tokens=3) for _ in range(20)]
        fleet.call(_until_waiting(fleet, "cold", 20))
        transitions.wait(lambda seen: seen == ["idle", "starting"], "starting, held", timeout=10)
        hold.unlink()
        answers = [f.result() for f in futures]
    assert [a.choices[0].text for a in answers] == [expected_text(3)] * 20
    assert transitions.seen == ["idle", "starting", "ready"]  # one start for all twenty
    assert demand(fleet, "cold").starts == 1
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in
               httpx.get(f"{fleet.url}/metrics", timeout=5).text.splitlines() if line.startswith("fleet_model_")}
    assert metrics['fleet_model_demand_starts_total{model="cold"}'] == 1
    assert metrics['fleet_model_waiting{model="cold"}'] == 0
    assert metrics['fleet_model_waited_seconds_total{model="cold"}'] > 0  # each waited for the start


def test_a_stream_waits_for_the_start_and_gets_every_token(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "cold", **ON_DEMAND, "engine_args": {"fake_start_delay": 0.3}}, ready=())
    fleet.wait_state("cold", "idle")
    with sdk(fleet) as client:
        chunks = list(client.completions.create(model="cold", prompt="hi", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected_text(4)


def test_an_idle_model_stops_after_idle_after_and_the_next_request_starts_it_again(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "m", **IDLE_STOP}, supervisor=FAST)  # start = launch: ready at once
    first = psutil.Process(engine_pid(fleet, "m"))
    transitions = fleet.transitions("m")
    transitions.wait(lambda seen: seen[-1] == "idle", "stopped after its idle time", timeout=10)
    assert transitions.seen == ["ready", "stopping", "idle"]
    assert not first.is_running() or first.status() == psutil.STATUS_ZOMBIE
    assert engine_pid(fleet, "m") is None
    with sdk(fleet) as client:
        assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices[0].text == expected_text(2)
    assert transitions.seen[3:5] == ["starting", "ready"]
    assert engine_pid(fleet, "m") not in (None, first.pid)


def test_a_stream_in_flight_keeps_an_idle_model_running_until_it_ends(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "m", "when_idle": "stop", "idle_after": 0.2,
                        "engine_args": {"fake_token_delay": 0.1}}, supervisor=FAST)
    transitions = fleet.transitions("m")
    with sdk(fleet) as client:
        chunks = list(client.completions.create(model="m", prompt="hi", max_tokens=15, stream=True))  # 1.4 s
    assert "".join(c.choices[0].text for c in chunks) == expected_text(15)  # whole: not stopped under it
    seen = transitions.wait(lambda s: s[-1] == "idle", "stopped once the stream ended", timeout=10)
    assert seen == ["ready", "stopping", "idle"]
    assert transitions.at[1] - fleet.call(_last_end(fleet, "m")) >= 0.2  # idle_after counted from the stream's end


async def _last_end(fleet: InProcessFleet, model: str) -> float:
    return max(r.stats.last_active for r in fleet.fleet.models[model].replicas)


def test_a_failed_start_fails_the_waiting_requests_naming_the_model_and_the_next_request_tries_again(
    fake_fleet: FakeFleets, tmp_path: Path,
) -> None:
    blocker = tmp_path / "fail"
    blocker.touch()
    fleet = fake_fleet({"name": "flaky", **ON_DEMAND, "engine_args": {"fake_fail_start_while": str(blocker)}},
                       ready=(), supervisor=FAST)
    fleet.wait_state("flaky", "idle")
    with httpx.Client(base_url=fleet.url, timeout=30) as http, concurrent.futures.ThreadPoolExecutor(3) as pool:
        failed = list(pool.map(lambda _: http.post("/v1/completions", json={"model": "flaky", "prompt": "hi"}), range(3)))
        for r in failed:
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "model_not_ready" and "'flaky' failed to start" in error["message"]
            assert "the next request tries again" in error["message"] and int(r.headers["retry-after"]) > 0
        assert fleet.wait_state("flaky", "idle") == "idle"  # not restarted on its own
        assert demand(fleet, "flaky").starts == 1
        blocker.unlink()
        r = http.post("/v1/completions", json={"model": "flaky", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected_text(2)
    assert demand(fleet, "flaky").starts == 2


def test_requests_beyond_max_queued_or_after_start_timeout_get_503_with_retry_after(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "stuck", **ON_DEMAND, "start_timeout": 1.5, "limits": {"max_queued": 2},
                        "engine_args": {"fake_hang_at_start": True}}, ready=(), supervisor=FAST)
    fleet.wait_state("stuck", "idle")
    body = {"model": "stuck", "prompt": "hi"}
    with httpx.Client(base_url=fleet.url, timeout=30) as http, concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(http.post, "/v1/completions", json=body) for _ in range(2)]
        fleet.call(_until_waiting(fleet, "stuck", 2))
        full = http.post("/v1/completions", json=body)
        assert full.status_code == 503 and "2 requests already wait" in full.json()["error"]["message"]
        assert int(full.headers["retry-after"]) > 0
        for future in waiting:
            r = future.result()
            assert r.status_code == 503 and "did not start within 1.5s (start_timeout)" in r.json()["error"]["message"]


async def _until_waiting(fleet: InProcessFleet, model: str, n: int) -> None:
    import asyncio

    async with asyncio.timeout(10):
        while fleet.fleet.models[model].demand.waiting < n:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("fields,message", [
    ({"when_idle": "stop"}, 'when_idle = "stop" needs idle_after'),
    ({"idle_after": 5}, 'idle_after needs when_idle = "sleep" or "stop"'),
    ({"start": "on_demand", "url": "http://10.0.0.1:8000"}, 'field "start": an engine at a url is started by whoever runs it'),
    ({"start": "later"}, "start"),
])
def test_on_demand_fields_are_checked_before_anything_starts(fields: dict[str, Any], message: str, tmp_path: Path) -> None:
    from fleets import fleet_toml

    from fleet.config.load import load_config
    from fleet.errors import ConfigError

    path = tmp_path / "fleet.toml"
    path.write_text(fleet_toml([{"name": "m", "source": "default", "port": 8001, **fields}], 8000))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert str(path) in text and 'model "m"' in text and message in text


def test_the_status_page_shows_an_idle_model_then_ready_once_a_request_started_it(
    fake_fleet: FakeFleets, tmp_path: Path,
) -> None:
    from browser import Browser

    fleet = fake_fleet({"name": "cold", **ON_DEMAND}, ready=())
    fleet.wait_state("cold", "idle")
    browser = Browser(fleet.url, tmp_path / "profile")
    try:
        page = browser.page
        state = '#engines tr[data-engine="cold"] .state'
        page.wait_for_selector(f'{state}[data-state="idle"]')
        with sdk(fleet) as client:
            client.completions.create(model="cold", prompt="hi", max_tokens=1)
        page.wait_for_selector(f'{state}[data-state="ready"]')
        assert browser.errors == []
    finally:
        browser.close()


def test_a_reload_gives_a_changed_on_demand_model_new_engines_that_wait_idle_too(fake_fleet: FakeFleets) -> None:
    from fleets import fake_config

    fleet = fake_fleet({"name": "m", **ON_DEMAND}, ready=())
    fleet.wait_state("m", "idle")
    with sdk(fleet) as client:
        assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices[0].text == expected_text(2)
        old_pid = engine_pid(fleet, "m")
        cfg = fleet.config
        changed = fake_config({"name": "m", **ON_DEMAND, "port": cfg.models[0].port, "engine_args": {"fake_word": "v"}},
                              gateway={"port": cfg.gateway.port})
        report = fleet.call(fleet.fleet.reload(changed))
        assert report.changed == ["m"] and not report.warnings
        assert fleet.state("m") == "idle" and engine_pid(fleet, "m") is None  # the old engine drained and stopped
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        assert client.completions.create(model="m", prompt="hi", max_tokens=2).choices[0].text == expected_text(2, word="v")
