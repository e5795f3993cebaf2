"""Replicas behind one model name (issue 18), with fake engines: the launcher starts one engine per
replica, the gateway routes each request by the model's policy, fails over when a replica refuses
the connection, and shows every replica in status and metrics; the rules of replicas and
placements in fleet.toml, rolling reloads, engines attached by url. (The same with real engines:
tests/e2e/test_replicas.py.)"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import signal
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest
from fleets import ROOT, FakeFleets, InProcessFleet, fake_config, fleet_toml, free_ports, wait_until

from fleet.config.load import parse_config
from fleet.errors import ConfigError


def complete(fleet: InProcessFleet, prompt: str = "hi", **body: Any) -> httpx.Response:
    return httpx.post(f"{fleet.url}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": 3, **body},
                      timeout=30)


def engine_requests(fleet: InProcessFleet, port: int) -> int:
    """What the fake engine on `port` counted itself."""
    return int(httpx.get(f"http://127.0.0.1:{port}/fake/stats", timeout=5).json()["requests"])


def two_replicas(fake_fleet: FakeFleets, supervisor: dict[str, Any] | None = None, **model: Any) -> tuple[InProcessFleet, int]:
    port = free_ports(2)
    return fake_fleet({"name": "m", "replicas": 2, "port": port, **model}, **({"supervisor": supervisor} if supervisor else {})), port


def test_replicas_split_gpus_evenly_and_take_ports_upward() -> None:
    cfg = parse_config({"models": [{"name": "m", "source": "x", "gpus": [0, 1, 2, 3], "port": 6000, "replicas": 2}]})
    (m,) = cfg.models
    assert [(r.replica_name, r.gpus, r.port, r.tensor_parallel_size) for r in m.replica_configs()] == [
        ("m.0", [0, 1], 6000, 2), ("m.1", [2, 3], 6001, 2)]
    single = parse_config({"models": [{"name": "s", "source": "x", "port": 6000}]}).models[0]
    assert [r.replica_name for r in single.replica_configs()] == ["s"]


def test_every_rule_applies_per_replica() -> None:
    with pytest.raises(ConfigError, match=r'model "m" \(models\[0\]\), field "replicas": 3 GPUs cannot be split'):
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
    os.kill(fleet.fleet.owners[name].pid, signal.SIGKILL)  # type: ignore[arg-type]
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
    rows = fleet.fleet.control.status().models
    assert [(r.model, r.replica, r.port) for r in rows] == [("m", "m.0", port), ("m", "m.1", port + 1)]
    assert sum(r.requests for r in rows) == 4
    assert sum(r.routed.get("least_loaded", 0) for r in rows) == 4
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=5).text
    assert 'fleet_replica_requests_total{model="m",replica="m.0"}' in metrics
    assert 'fleet_replica_state{model="m",replica="m.1",state="ready"} 1.0' in metrics
    for r in rows:  # ties go either way: four requests one after another may all land on one replica
        if routed := r.routed.get("least_loaded", 0):
            assert f'fleet_replica_routed_total{{model="m",outcome="least_loaded",replica="{r.replica}"}} {float(routed)}' in metrics


# --- placements, attached engines, rolling reload ------------------------------------------------

FAST = {"restart_backoff": 0.2, "restart_backoff_max": 0.4, "max_restarts": 1, "health_interval": 0.2,
        "health_failures": 2, "stop_grace": 3.0, "drain_timeout": 10.0}


def test_placements_give_each_replica_its_own_gpus_port_host_or_url() -> None:
    (m,) = parse_config({"models": [{"name": "m", "source": "x", "placements": [
        {"gpus": [0, 1], "port": 6000}, {"gpus": [3], "port": 7000, "host": "0.0.0.0"},
        {"url": "http://10.0.0.2:6000", "gpus": [0]}]}]}).models
    assert m.replicas == 3 and m.port == 6000
    assert [(r.replica_name, r.gpus, r.host, r.port, r.attached, r.address) for r in m.replica_configs()] == [
        ("m.0", [0, 1], "127.0.0.1", 6000, False, ("127.0.0.1", 6000)),
        ("m.1", [3], "0.0.0.0", 7000, False, ("0.0.0.0", 7000)),
        ("m.2", [0], "10.0.0.2", 6000, True, ("10.0.0.2", 6000))]  # another machine's GPU 0 and port: not ours
    (one,) = parse_config({"models": [{"name": "a", "source": "x", "url": "http://10.0.0.3:5000"}]}).models
    assert (one.port, one.host, one.attached, one.replica_name) == (5000, "10.0.0.3", True, "a")


@pytest.mark.parametrize(("model", "message"), [
    ({"placements": [{"gpus": [0]}]}, r'field "placements\[0\]": a placement gives a port'),
    ({"placements": [{"url": "https://h:1"}]}, r"not http://HOST:PORT"),
    ({"placements": [{"url": "http://tok@h:1"}]}, r"its token never goes in the URL"),
    ({"placements": [{"url": "http://h:1", "port": 2}]}, r"port 2 is not the port of url"),
    ({"placements": [{"port": 6000}], "gpus": [0]}, r"each placement lists its own gpus"),
    ({"placements": [{"port": 6000}, {"port": 6001}], "replicas": 3}, r"replicas = 3 but 2 placements"),
    ({"url": "http://h:1", "replicas": 2}, r"list placements for several"),
    ({"placements": [{"port": 6000}, {"port": 6000}]}, r'field "placements\[1\].port": 6000 is also the port of model "m.0"'),
    ({"placements": [{"url": "http://h:1"}, {"url": "http://h:1"}]}, r'field "placements\[1\].url": http://h:1 is also'),
])
def test_a_placement_that_cannot_work_is_refused_naming_the_field(model: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"models": [{"name": "m", "source": "x", **model}]})


def test_each_engine_reads_its_own_replica_as_a_one_engine_config() -> None:
    (m,) = parse_config({"models": [{"name": "m", "source": "x", "gpus": [0, 1, 2, 3], "port": 6000, "replicas": 2}]}).models
    from fleet.config.model import ModelConfig

    engine = ModelConfig.model_validate_json(m.replica_configs()[1].engine_json())  # what `python -m fleet.engine` reads
    assert (engine.gpus, engine.port, engine.replicas, engine.tensor_parallel_size) == ([2, 3], 6001, 1, 2)


def stream_requests(fleet: InProcessFleet, stop: threading.Event, answers: list[int], pause: float = 0.02) -> None:
    """One client sending requests back to back until `stop`: each answer's status in `answers`."""
    while not stop.is_set():
        try:
            answers.append(complete(fleet, "steady").status_code)
        except httpx.HTTPError:
            answers.append(-1)
        time.sleep(pause)


@pytest.mark.parametrize("ports", ["same", "new"])
def test_rolling_reload_replaces_one_replica_at_a_time_and_fails_no_request(fake_fleet: FakeFleets, ports: str) -> None:
    """Same ports (or the CPU's cores): each old replica leaves, then its successor starts. New ports
    and GPUs: each successor is ready before its predecessor leaves. (The fake engines use no GPU;
    the ids only place them.)"""
    gpus = {} if ports == "same" else {"gpus": [0, 1]}
    fleet, port = two_replicas(fake_fleet, engine_args={"fake_token_delay": 0.02}, supervisor=FAST, **gpus)
    new_port = port if ports == "same" else free_ports(2)
    gpus = {} if ports == "same" else {"gpus": [2, 3]}
    pids = {name: fleet.fleet.owners[name].pid for name in ("m.0", "m.1")}
    serving: list[int] = []  # replicas serving at every change of any engine's state during the reload
    fleet.fleet.console.print = lambda *a, **k: serving.append(  # type: ignore[method-assign]
        sum(r.lifecycle.state.serving for r in fleet.fleet.models["m"].replicas))
    stop, answers = threading.Event(), []
    clients = [threading.Thread(target=stream_requests, args=(fleet, stop, answers)) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        new = fake_config({"name": "m", "replicas": 2, "port": new_port, "engine_args": {"fake_word": "NEW"}, **gpus},
                          supervisor=FAST)
        report = fleet.call(fleet.fleet.reload(new.model_copy(update={"gateway": fleet.config.gateway})), timeout=120)
    finally:
        stop.set()
        for c in clients:
            c.join(30)
    assert report.changed == ["m"] and report.warnings == []
    assert [(r.replica, r.port) for r in fleet.fleet.control.status().models] == [("m.0", new_port), ("m.1", new_port + 1)]
    assert len(answers) > 20 and set(answers) == {200}, collections.Counter(answers)
    assert min(serving) >= (1 if ports == "same" else 2), serving  # never without a serving copy (new ports: two)
    assert all(fleet.fleet.owners[name].pid not in (None, pids[name]) for name in pids)
    assert all(complete(fleet, f"after {i}").json()["choices"][0]["text"].split()[0].startswith("NEW") for i in range(6))


def test_rolling_reload_stops_at_a_successor_that_fails_and_the_rest_keep_serving(fake_fleet: FakeFleets) -> None:
    fleet, port = two_replicas(fake_fleet, supervisor=FAST)
    old_pid = fleet.fleet.owners["m.1"].pid
    new = fake_config({"name": "m", "replicas": 2, "port": port, "engine_args": {"fake_exit_at_start": 3}}, supervisor=FAST)
    report = fleet.call(fleet.fleet.reload(new.model_copy(update={"gateway": fleet.config.gateway})), timeout=120)
    assert len(report.warnings) == 1 and "stopped at replica 0" in report.warnings[0] and "m.1 kept" in report.warnings[0]
    assert fleet.fleet.owners["m.1"].pid == old_pid  # never touched
    assert all(complete(fleet, f"still {i}").status_code == 200 for i in range(5))


def test_admission_resize_keeps_running_requests_and_frees_queued_ones() -> None:
    from fleet.gateway.admission import Admission

    async def scenario() -> None:
        gate = Admission("m", max_concurrent=1, max_queued=5)
        async with gate.slot():
            second = gate.slot()
            waiting = asyncio.ensure_future(second.__aenter__())
            await asyncio.sleep(0)
            assert gate.queued == 1 and not waiting.done()
            gate.resize(2, 5, 60.0)  # a reload that doubled the replicas
            await asyncio.wait_for(waiting, 1)
            assert gate.running == 2 and gate.queued == 0
            await second.__aexit__(None, None, None)
        assert gate.running == 0

    asyncio.run(scenario())


class OutsideEngines:
    """Fake engines that no fleet starts (as `fleet engine` runs one on another machine), each
    listening before `start` returns; all of them killed when the block ends."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, port: int, token: str, name: str = "m") -> subprocess.Popen[bytes] | None:
        """The engine, listening on `port`; None if it exited first (the port was taken meanwhile:
        free ports come from the ephemeral range, which the suite's own client connections use)."""
        from fake_engine import fake_command

        cfg = parse_config({"models": [{"name": name, "source": "fake", "port": port}]}).models[0]
        engine = subprocess.Popen(fake_command(cfg), env={**os.environ, "FLEET_ENGINE_TOKEN": token},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append(engine)

        def listening_or_gone() -> bool:
            if engine.poll() is not None:
                return True
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(listening_or_gone, "the outside engine listens", timeout=60)  # before the fleet picks its own port
        return engine if engine.poll() is None else None

    def __enter__(self) -> OutsideEngines:
        return self

    def __exit__(self, *exc: object) -> None:
        for engine in self.started:
            engine.kill()
            engine.wait()


def attached_fleet(fake_fleet: FakeFleets, monkeypatch: pytest.MonkeyPatch, outside: OutsideEngines, token: str,
                   **kw: Any) -> tuple[InProcessFleet, int, int]:
    """A fleet of two replicas of "m": its own engine and one outside it at a url (started with `token`)."""
    monkeypatch.setenv("FLEET_ENGINE_TOKEN", "shared-secret")
    own = free_ports(2)
    while outside.start(own + 1, token) is None:  # its port was taken before it bound it: two others
        own = free_ports(2)
    fleet = fake_fleet({"name": "m", "placements": [{"port": own}, {"url": f"http://127.0.0.1:{own + 1}"}]},
                       supervisor=FAST, **kw)
    return fleet, own, own + 1


def test_an_attached_engine_serves_leaves_rotation_while_it_is_down_and_rejoins(
    fake_fleet: FakeFleets, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OutsideEngines() as engines:
        fleet, own, outside = attached_fleet(fake_fleet, monkeypatch, engines, "shared-secret")
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert set(pool.map(lambda i: complete(fleet, f"p{i}").status_code, range(18))) == {200}
        assert engine_requests(fleet, outside) > 0 and engine_requests(fleet, own) > 0
        engines.started[-1].kill()  # the one listening (a try whose port was taken exited)
        engines.started[-1].wait()
        answers = [complete(fleet, f"down {i}").status_code for i in range(10)]
        assert answers == [200] * 10  # refused connections fail over; then it is out of rotation
        assert fleet.wait_state("m.1", "failed", timeout=10) == "failed"
        assert "out of rotation" in fleet.fleet.owners["m.1"].lifecycle.reason
        # back (fleet never restarted it itself); on its own port, which a client connection of the
        # suite may hold a moment as its ephemeral port: tried until it binds
        wait_until(lambda: engines.start(outside, "shared-secret") is not None, "the outside engine listens again",
                   timeout=30)
        assert fleet.wait_state("m.1", "ready", timeout=30) == "ready"
        assert fleet.fleet.owners["m.1"].total_restarts == 0
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            assert set(pool.map(lambda i: complete(fleet, f"again {i}").status_code, range(18))) == {200}
        assert engine_requests(fleet, outside) > 0


def test_an_attached_engine_with_another_token_never_joins(fake_fleet: FakeFleets, monkeypatch: pytest.MonkeyPatch) -> None:
    with OutsideEngines() as engines:
        fleet, _, outside = attached_fleet(fake_fleet, monkeypatch, engines, "some-other-token", ready=["m.0"])
        stats = f"http://127.0.0.1:{outside}/fake/stats"
        wait_until(lambda: httpx.get(stats, timeout=5).json()["refused"] >= 2, "the gateway's checks were refused")
        assert all(complete(fleet, f"p{i}").status_code == 200 for i in range(6))
        assert fleet.state("m.1") == "starting" and engine_requests(fleet, outside) == 0


def fleet_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "FLEET_ENGINE_TOKEN"}
    return subprocess.run([str(ROOT / ".venv/bin/fleet"), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def test_fleet_check_shows_each_placement_and_fleet_engine_refuses_what_cannot_work(tmp_path: Any) -> None:
    own = free_ports(1)
    config = tmp_path / "fleet.toml"
    config.write_text(fleet_toml([{"name": "m", "source": "default", "placements": [
        {"port": own}, {"url": "http://10.1.2.3:7001", "gpus": [0]}, {"url": "http://10.1.2.4:7001"}]}], free_ports(1)))
    refused = fleet_cli("check", "--config", str(config))
    assert refused.returncode == 2 and "needs the fleet's shared engine token" in refused.stderr
    ok = fleet_cli("check", "--config", str(config), env={"FLEET_ENGINE_TOKEN": "t"})
    assert ok.returncode == 0, ok.stderr
    assert "attached: http://10.1.2.3:7001" in ok.stdout and "m.2" in ok.stdout
    no_token = fleet_cli("engine", "--config", str(config), "--model", "m", "--replica", "1")
    assert no_token.returncode == 2 and "no engine token" in no_token.stderr
    which = fleet_cli("engine", "--config", str(config), "--model", "m", env={"FLEET_ENGINE_TOKEN": "t"})
    assert which.returncode == 2 and "has 3 replicas: say which with --replica" in which.stderr
    unknown = fleet_cli("engine", "--config", str(config), "--model", "nope", env={"FLEET_ENGINE_TOKEN": "t"})
    assert unknown.returncode == 2 and "no model named 'nope'" in unknown.stderr
    beyond = fleet_cli("engine", "--config", str(config), "--model", "m", "--replica", "3", env={"FLEET_ENGINE_TOKEN": "t"})
    assert beyond.returncode == 2 and "replicas 0 to 2, not 3" in beyond.stderr
