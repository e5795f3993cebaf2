"""Replicas behind one model name (issue 18), with fake engines: the launcher starts one engine per
replica, the gateway routes each request by the model's policy, fails over when a replica refuses
the connection, and shows every replica in status and metrics. (The same with real engines:
test_replicas_e2e.py.)"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from typing import Any

import httpx
import pytest
from conftest import FakeFleets, InProcessFleet, free_ports

from fleet.config.load import parse_config
from fleet.errors import ConfigError


def complete(fleet: InProcessFleet, prompt: str = "hi", **body: Any) -> httpx.Response:
    return httpx.post(f"{fleet.url}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 3, **body},
                      timeout=30)


def engine_requests(fleet: InProcessFleet, port: int) -> int:
    """What the fake engine on `port` counted itself."""
    return int(httpx.get(f"http://127.0.0.1:{port}/fake/stats", timeout=5).json()["requests"])


def two_replicas(fake_fleet: FakeFleets, **model: Any) -> tuple[InProcessFleet, int]:
    port = free_ports(2)
    return fake_fleet({"name": "m", "replicas": 2, "port": port, **model}), port


def test_replicas_split_gpus_evenly_and_take_ports_upward() -> None:
    cfg = parse_config({"models": [{"name": "m", "source": "x", "gpus": [0, 1, 2, 3], "port": 6000, "replicas": 2}]})
    (m,) = cfg.models
    assert [(r.replica_name, r.gpus, r.port, r.tensor_parallel_size) for r in m.replica_configs()] == [
        ("m.0", [0, 1], 6000, 2), ("m.1", [2, 3], 6001, 2)]
    single = parse_config({"models": [{"name": "s", "source": "x", "port": 6000}]}).models[0]
    assert [r.replica_name for r in single.replica_configs()] == ["s"]


def test_every_rule_applies_per_replica() -> None:
    with pytest.raises(ConfigError, match=r'model "m" \(models\[0\]\), field "replicas": Value error, 3 GPUs cannot be split'):
        parse_config({"models": [{"name": "m", "source": "x", "gpus": [0, 1, 2], "port": 6000, "replicas": 2}]})
    with pytest.raises(ConfigError, match=r'model "b" \(models\[1\]\), field "port": 6001 is also the port of model "m.1"'):
        parse_config({"models": [{"name": "m", "source": "x", "port": 6000, "replicas": 2},
                                 {"name": "b", "source": "x", "port": 6001}]})
    with pytest.raises(ConfigError, match=r'field "replicas": 8000 \(replica 1\'s port\) is the gateway\'s port'):
        parse_config({"gateway": {"port": 8000}, "models": [{"name": "m", "source": "x", "port": 7999, "replicas": 2}]})
    with pytest.raises(ConfigError, match="routing"):
        parse_config({"models": [{"name": "m", "source": "x", "port": 6000, "routing": "random"}]})


def test_least_loaded_requests_reach_every_replica_counted_by_the_engines(fake_fleet: FakeFleets) -> None:
    fleet, port = two_replicas(fake_fleet, engine_args={"fake_token_delay": 0.05})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete(fleet, f"prompt {i}"), range(24)))
    assert all(r.status_code == 200 for r in answers)
    counts = [engine_requests(fleet, port), engine_requests(fleet, port + 1)]
    assert sum(counts) == 24 and min(counts) >= 6, counts  # concurrent requests spread over both


def test_one_model_in_the_model_list_ready_while_any_replica_is(fake_fleet: FakeFleets) -> None:
    fleet, _ = two_replicas(fake_fleet)
    cards = httpx.get(f"{fleet.url}/v1/models", timeout=5).json()["data"]
    assert [(c["id"], c["state"]) for c in cards] == [("m", "ready")]


def test_prefix_policy_keeps_one_prompt_on_one_replica(fake_fleet: FakeFleets) -> None:
    fleet, port = two_replicas(fake_fleet, routing="prefix")
    for _ in range(10):
        assert complete(fleet, "the same long system prompt, then a question").status_code == 200
    counts = sorted([engine_requests(fleet, port), engine_requests(fleet, port + 1)])
    assert counts == [0, 10]
    for i in range(20):  # and different prompts spread
        assert complete(fleet, f"another prompt {i}").status_code == 200
    assert min(engine_requests(fleet, port), engine_requests(fleet, port + 1)) > 0


@pytest.mark.parametrize("how", ["user", "header"])
def test_session_policy_sticks_a_session_to_one_replica(fake_fleet: FakeFleets, how: str) -> None:
    fleet, port = two_replicas(fake_fleet, routing="session", session_header="X-Session")
    for i in range(12):  # the prompt changes; the session does not
        if how == "user":
            r = complete(fleet, f"q{i}", user="alice")
        else:
            r = httpx.post(f"{fleet.url}/v1/completions", json={"model": "m", "prompt": f"q{i}", "max_tokens": 2},
                           headers={"X-Session": "alice"}, timeout=30)
        assert r.status_code == 200
    assert sorted([engine_requests(fleet, port), engine_requests(fleet, port + 1)]) == [0, 12]


def test_killed_replica_costs_no_request_that_had_not_started_and_rejoins(fake_fleet: FakeFleets) -> None:
    fleet, port = two_replicas(fake_fleet, routing="session")
    # find which replica "bob" sticks to, then kill that one: every later request of bob's
    # must be served by the other replica (refused connection -> failover, then out of rotation)
    assert complete(fleet, "x", user="bob").status_code == 200
    home = 0 if engine_requests(fleet, port) == 1 else 1
    name = f"m.{home}"
    transitions = fleet.transitions(name)
    os.kill(fleet.fleet.engines[name].pid, signal.SIGKILL)  # type: ignore[arg-type]
    answers = [complete(fleet, f"after {i}", user="bob") for i in range(20)]
    assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers if r.status_code != 200]
    fleet.wait_state(name, "ready", timeout=60)
    assert "restarting" in transitions.seen
    before = engine_requests(fleet, port + home)
    assert complete(fleet, "back", user="bob").status_code == 200  # home again once it serves
    assert engine_requests(fleet, port + home) == before + 1


def test_status_and_metrics_show_each_replica(fake_fleet: FakeFleets) -> None:
    fleet, port = two_replicas(fake_fleet)
    for i in range(4):
        assert complete(fleet, f"p{i}").status_code == 200
    rows = fleet.fleet.status().models
    assert [(r.model, r.replica, r.port) for r in rows] == [("m", "m.0", port), ("m", "m.1", port + 1)]
    assert sum(r.requests for r in rows) == 4
    assert sum(r.routed.get("least_loaded", 0) for r in rows) == 4
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=5).text
    assert 'fleet_replica_requests_total{model="m",replica="m.0"}' in metrics
    assert 'fleet_replica_state{model="m",replica="m.1",state="ready"} 1.0' in metrics
    assert 'fleet_replica_routed_total{model="m",outcome="least_loaded",replica="m.0"}' in metrics
