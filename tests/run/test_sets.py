"""[[sets]]: models that share GPUs beyond what fits at once (fleet/run/swap.py, its policy in
swap_policy.py; sleeping and waking in the owner), through the real launcher and gateway, with
fake engines (real processes) and the openai SDK. On "GPUs" (the fake engine ignores them) a
member put away sleeps, its process kept; on the CPU it stops."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

import httpx
import openai
import psutil
from fake_engine import expected_text
from fleets import FAST, FakeFleets, InProcessFleet

from fleet.lifecycle import AWAY


def sdk(fleet: InProcessFleet, timeout: float = 30) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=timeout)


def ask(client: openai.OpenAI, model: str, tokens: int = 2) -> str:
    return client.completions.create(model=model, prompt="hi", max_tokens=tokens).choices[0].text


def alive(pid: int | None) -> bool:
    if pid is None or not psutil.pid_exists(pid):
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Census:
    """At every state change of a set's engines: how many hold their room (not idle, asleep or
    stopped) and how many engine processes live; and each member's state path."""

    def __init__(self, fleet: InProcessFleet, names: list[str]) -> None:
        self.owners = [fleet.fleet.owners[n] for n in names]
        self.lock = threading.Lock()
        self.holding: list[int] = []
        self.processes: list[int] = []
        self.paths: dict[str, list[str]] = {n: [] for n in names}
        self.at: dict[str, list[float]] = {n: [] for n in names}

        async def listen() -> None:
            for owner in self.owners:
                owner.lifecycle.listeners.append(self._on_change)

        fleet.call(listen())

    def _on_change(self, lc: Any, _old: Any, _why: str) -> None:
        with self.lock:
            self.paths[lc.name].append(lc.state.value)
            self.at[lc.name].append(time.monotonic())
            self.holding.append(sum(o.lifecycle.state not in AWAY for o in self.owners))
            self.processes.append(sum(alive(o.pid) for o in self.owners))


LATER = {"start": "on_demand"}


def one_at_a_time(*names: str, **set_fields: Any) -> dict[str, Any]:
    return {"sets": [{"name": "desk", "models": list(names), "min_awake": 0, **set_fields}]}


def test_three_models_in_a_set_of_one_answer_in_turn_and_never_run_two_engines_at_once(
    fake_fleet: FakeFleets,
) -> None:
    names = ["a", "b", "c"]
    fleet = fake_fleet(*({"name": n, "start": "on_demand", "engine_args": {"fake_word": n}} for n in names), ready=(), supervisor=FAST,
                       **one_at_a_time(*names))
    for n in names:
        assert fleet.wait_state(n, "idle") == "idle"  # members start on demand
    census = Census(fleet, names)
    with sdk(fleet) as client:
        for model in ["a", "b", "c", "a", "c", "b"]:
            assert ask(client, model) == expected_text(2, word=model)
    assert max(census.holding) == 1 and max(census.processes) == 1
    assert census.paths["a"] == ["starting", "ready", "stopping", "idle", "starting", "ready", "stopping", "idle"]
    swaps = fleet.fleet.swaps["desk"].swaps
    assert swaps == 5  # every request but the first put the previous one away
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=5).text
    assert 'fleet_set_swaps_total{set="desk"} 5.0' in metrics
    assert 'fleet_model_swapped_out_total{model="a"} 2.0' in metrics


def test_at_launch_the_members_that_start_at_launch_start_while_they_fit_in_the_sets_order(
    fake_fleet: FakeFleets,
) -> None:
    fleet = fake_fleet({"name": "a"}, {"name": "b"}, {"name": "lazy", **LATER}, ready=("b",),
                       supervisor=FAST, **one_at_a_time("lazy", "b", "a"))
    assert fleet.wait_state("a", "idle") == "idle" and fleet.state("lazy") == "idle"
    assert fleet.fleet.owners["a"].pid is None


def test_a_stream_in_flight_finishes_whole_while_a_request_for_another_member_waits(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "a", "engine_args": {"fake_token_delay": 0.1}}, {"name": "b"}, ready=(),
                       supervisor=FAST, **one_at_a_time("a", "b"))
    census = Census(fleet, ["a", "b"])
    with sdk(fleet) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert ask(client, "a") == expected_text(2)
        stream = pool.submit(lambda: [c.choices[0].text for c in
                                      client.completions.create(model="a", prompt="hi", max_tokens=12, stream=True)])
        time.sleep(0.3)  # the stream is under way (no readiness signal for "half-way through a stream")
        assert ask(client, "b") == expected_text(2)
        streamed = stream.result()
        ended = time.monotonic()
    assert "".join(streamed) == expected_text(12)  # whole: "a" was drained, not cut
    assert census.paths["a"][-2:] == ["stopping", "idle"]
    b_started = census.at["b"][census.paths["b"].index("starting")]
    a_gone = census.at["a"][-1]
    assert b_started >= a_gone and max(census.processes) == 1
    assert ended >= a_gone


def test_a_member_just_started_keeps_its_place_for_min_awake(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "a", **LATER}, {"name": "b", **LATER}, ready=(), supervisor=FAST,
                       **one_at_a_time("a", "b", min_awake=1.5))
    fleet.wait_state("a", "idle")
    census = Census(fleet, ["a", "b"])
    with sdk(fleet) as client:
        ask(client, "a")
        ask(client, "b")
    a_started = census.at["a"][census.paths["a"].index("starting")]
    b_started = census.at["b"][census.paths["b"].index("starting")]
    assert b_started - a_started >= 1.5


def test_the_lowest_priority_member_goes_first_then_the_least_recently_used(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "keep", "priority": 5}, {"name": "low"}, {"name": "new"}, ready=(),
                       supervisor=FAST, **one_at_a_time("keep", "low", "new", awake=2))
    with sdk(fleet) as client:
        ask(client, "keep")
        ask(client, "low")  # most recently used, but the lower priority
        ask(client, "new")
    assert fleet.state("keep") == "ready" and fleet.state("low") == "idle" and fleet.state("new") == "ready"


def test_on_gpus_a_member_put_away_sleeps_keeping_its_process_and_wakes_for_its_next_request(
    fake_fleet: FakeFleets,
) -> None:
    gpu = {"gpus": [0], "gpu_memory_utilization": 0.8, **LATER}
    fleet = fake_fleet({"name": "a", **gpu}, {"name": "b", **gpu, "sleep_level": 2}, ready=(), supervisor=FAST,
                       **one_at_a_time("a", "b"))
    fleet.wait_state("a", "idle")
    census = Census(fleet, ["a", "b"])
    with sdk(fleet) as client:
        ask(client, "a")
        a_pid = fleet.fleet.owners["a"].pid
        ask(client, "b")
        assert fleet.state("a") == "sleeping" and fleet.fleet.owners["a"].pid == a_pid and alive(a_pid)
        ask(client, "a")  # woken, not started: the same process
        assert fleet.fleet.owners["a"].pid == a_pid
        stats = httpx.get(f"http://127.0.0.1:{fleet.fleet.owners['a'].cfg.port}/fake/stats", timeout=5).json()
        b_stats = httpx.get(f"http://127.0.0.1:{fleet.fleet.owners['b'].cfg.port}/fake/stats", timeout=5).json()
    assert stats["sleep_mode"] and stats["sleeps"] == [1] and stats["wakes"] == 1 and stats["asleep"] == 0
    assert b_stats["sleeps"] == [2]  # its sleep_level
    assert census.paths["a"] == ["starting", "ready", "stopping", "sleeping", "waking", "ready"]
    assert max(census.holding) == 1
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=5).text
    assert 'fleet_model_wakes_total{model="a"} 1.0' in metrics
    assert 'fleet_model_wake_seconds_total{model="a"}' in metrics


def test_by_memory_share_members_that_fit_together_are_awake_together(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "a", "gpus": [0], "gpu_memory_utilization": 0.4},
                       {"name": "b", "gpus": [0], "gpu_memory_utilization": 0.4},
                       {"name": "c", "gpus": [0], "gpu_memory_utilization": 0.5},
                       ready=(), supervisor=FAST, **one_at_a_time("a", "b", "c"))
    census = Census(fleet, ["a", "b", "c"])
    with sdk(fleet) as client:
        ask(client, "a")
        ask(client, "b")
        assert fleet.state("a") == "ready" and fleet.state("b") == "ready"  # 0.8 of 0.95 fits
        ask(client, "c")  # 0.5 more: the least recently used (a) goes, b stays (0.9)
    assert fleet.state("a") == "sleeping" and fleet.state("b") == "ready" and fleet.state("c") == "ready"
    assert max(census.holding) == 2


def test_an_idle_model_that_sleeps_keeps_its_process_and_wakes_on_the_next_request(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "m", "gpus": [0], "when_idle": "sleep", "idle_after": 0.3,
                        "engine_args": {"fake_wake_delay": 0.2}}, supervisor=FAST)
    pid = fleet.fleet.owners["m"].pid
    assert fleet.wait_state("m", "sleeping", timeout=10) == "sleeping"
    with sdk(fleet) as client:
        began = time.monotonic()
        assert ask(client, "m") == expected_text(2)
        assert time.monotonic() - began >= 0.2  # it waited for the wake
    assert fleet.fleet.owners["m"].pid == pid
    assert fleet.wait_state("m", "sleeping", timeout=10) == "sleeping"  # and back to sleep once idle again


def test_an_engine_that_cannot_sleep_is_stopped_instead(fake_fleet: FakeFleets) -> None:
    fleet = fake_fleet({"name": "m", "gpus": [0], "when_idle": "sleep", "idle_after": 0.2,
                        "engine_args": {"fake_sleep_fails": True}}, supervisor=FAST)
    transitions = fleet.transitions("m")
    transitions.wait(lambda seen: seen[-1:] == ["idle"], "stopped after the failed sleep", timeout=10)
    assert fleet.fleet.owners["m"].pid is None
    with sdk(fleet) as client:
        assert ask(client, "m") == expected_text(2)  # started again


def test_fleet_status_and_the_models_list_show_a_sleeping_member(fake_fleet: FakeFleets) -> None:
    gpu = {"gpus": [0], "gpu_memory_utilization": 0.8}
    fleet = fake_fleet({"name": "a", **gpu}, {"name": "b", **gpu}, ready=(), supervisor=FAST, **one_at_a_time("a", "b"))
    with sdk(fleet) as client:
        ask(client, "a")
        ask(client, "b")
    cards = {c["id"]: c["state"] for c in httpx.get(f"{fleet.url}/v1/models", timeout=5).json()["data"]}
    assert cards == {"a": "sleeping", "b": "ready"}


ADMIN = "admin-secret"


def test_sleep_and_wake_from_the_control_route_put_a_model_away_and_bring_it_back(fake_fleet: FakeFleets) -> None:
    gpu = {"gpus": [0], "gpu_memory_utilization": 0.8}
    fleet = fake_fleet({"name": "a", **gpu}, {"name": "b", **gpu, **LATER}, {"name": "always"}, supervisor=FAST,
                       ready=("a",), **one_at_a_time("a", "b"))
    pid = fleet.fleet.owners["a"].pid
    with httpx.Client(base_url=fleet.url, timeout=30) as http:
        slept = http.post("/fleet/models/a/sleep")
        assert slept.status_code == 200 and slept.json() == {"model": "a", "action": "sleep", "state": "sleeping"}
        assert fleet.fleet.owners["a"].pid == pid
        woke = http.post("/fleet/models/b/wake")  # its set has room: a sleeps already
        assert woke.json()["state"] == "ready" and fleet.state("a") == "sleeping"
        woke = http.post("/fleet/models/a/wake")  # and now b makes room
        assert woke.json()["state"] == "ready" and fleet.fleet.owners["a"].pid == pid
        assert fleet.wait_state("b", "sleeping") == "sleeping"
        refused = http.post("/fleet/models/always/sleep")
        assert refused.status_code == 400 and "runs from launch to stop" in refused.json()["error"]["message"]
        assert http.post("/fleet/models/nope/wake").status_code == 404
        assert http.post("/fleet/models/a/nap").json()["error"]["param"] == "action"
        rows = {r["model"]: r for r in http.get("/fleet/status").json()["models"]}
    assert rows["a"]["on_demand"] and rows["a"]["swap_set"] == "desk" and not rows["always"]["on_demand"]


def test_the_status_page_sleeps_and_wakes_a_model_with_the_admin_key(fake_fleet: FakeFleets, tmp_path: Any) -> None:
    from browser import Browser

    fleet = fake_fleet({"name": "m", "when_idle": "stop", "idle_after": 600}, supervisor=FAST,
                       ui={"admin_key": ADMIN})
    browser = Browser(fleet.url, tmp_path / "profile")
    try:
        page = browser.page
        row = '#engines tr[data-engine="m"]'
        page.fill("#key", ADMIN)
        page.click("#key-form button")
        page.wait_for_selector(f'{row} .state[data-state="ready"]')
        page.click(f"{row} button:text('Sleep')")
        page.wait_for_selector(f'{row} .state[data-state="idle"]')  # the CPU build: sleeping is stopping
        assert fleet.fleet.owners["m"].pid is None
        page.click(f"{row} button:text('Wake')")
        page.wait_for_selector(f'{row} .state[data-state="ready"]')
        assert browser.errors == []
    finally:
        browser.close()


def test_a_reload_that_changes_a_set_keeps_its_one_decision_at_a_time(fake_fleet: FakeFleets) -> None:
    from fleets import fake_config

    models = [{"name": "a", **LATER}, {"name": "b", **LATER}]
    fleet = fake_fleet(*models, ready=(), supervisor=FAST, **one_at_a_time("a", "b"))
    before = fleet.fleet.swaps["desk"]
    new = fake_config(*[{**m, "port": fleet.fleet.config.model(m["name"]).port} for m in models],
                      gateway={"port": fleet.fleet.config.gateway.port}, supervisor=FAST,
                      **one_at_a_time("a", "b", min_awake=5))
    fleet.call(fleet.fleet.reload(new))
    after = fleet.fleet.swaps["desk"]
    assert after is not before and after.room.min_awake == 5
    assert after.lock is before.lock  # a bring-up under way on the old set still holds the new one back
    with sdk(fleet) as client:
        assert ask(client, "a") == expected_text(2)
