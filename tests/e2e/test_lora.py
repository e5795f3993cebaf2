"""LoRA adapters as model names (issue 34), on real vLLM CPU engines through `fleet launch`: real
PEFT adapters of the tiny model (random non-zero weights), served by the base's engines (two
replicas). The strongest check that the adapter, not something else, was applied: its greedy
answer differs from the base's and equals that of the same adapter merged into the base's weights
and served as a model of its own. Adapters loaded and unloaded at run time, added by a reload
without a restart, and routed to the replica that holds them."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fleets import ROOT, TINY, FleetProcess, fleet_toml, free_port, free_ports, running_fleet
from tiny_model import write_lora_adapter, write_merged_model

ALL, ONLY_A1, ADMIN = "sk-all", "sk-only-a1", "admin-secret"
TABLES = f'[auth]\nkeys = ["{ALL}", {{ key = "{ONLY_A1}", models = ["tiny-a1"] }}]\n[ui]\nadmin_key = "{ADMIN}"\n'


class LoraFleet:
    def __init__(self, fleet: FleetProcess, tmp: Path, models: list[dict[str, Any]]) -> None:
        self.fleet, self.tmp, self.models = fleet, tmp, models


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[LoraFleet]:
    tmp = tmp_path_factory.mktemp("lora")
    a1 = write_lora_adapter(tiny_model, tmp / "a1", seed=1)
    a2 = write_lora_adapter(tiny_model, tmp / "a2", seed=2)
    write_lora_adapter(tiny_model, tmp / "a3", seed=3)  # loaded at run time, and by a reload
    merged = write_merged_model(tiny_model, a1, tmp / "merged-a1")
    models = [
        {"name": "tiny", "source": str(tiny_model), "port": free_ports(2), "replicas": 2, **TINY,
         "adapters": {"tiny-a1": str(a1), "tiny-a2": str(a2)}, "max_lora_rank": 8, "max_loras": 2},
        {"name": "tiny-merged", "source": str(merged), "port": free_port(), **TINY},
    ]
    with running_fleet(models, tmp, tables=TABLES) as fleet:
        yield LoraFleet(fleet, tmp, models)


@pytest.fixture
def lora_fleet(lora: LoraFleet) -> FleetProcess:
    return lora.fleet


def client(fleet: FleetProcess, key: str = ALL) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.url + "/v1", api_key=key, max_retries=0, timeout=120)


def greedy(c: openai.OpenAI, model: str, tokens: int = 12) -> str:
    return c.completions.create(model=model, prompt="The capital of France is", max_tokens=tokens, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text


def test_an_adapter_answers_as_the_adapter_merged_into_the_base_and_not_as_the_base(lora_fleet: FleetProcess) -> None:
    with client(lora_fleet) as c:
        base, adapter, merged = greedy(c, "tiny"), greedy(c, "tiny-a1"), greedy(c, "tiny-merged")
        other = greedy(c, "tiny-a2")
        answer = c.completions.create(model="tiny-a1", prompt="The capital of France is", max_tokens=4, temperature=0)
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="tiny-a1", prompt="The capital of France is", max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        chats = [c.chat.completions.create(model=m, messages=[{"role": "user", "content": "Hello world"}], max_tokens=8,
                                           temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
                 for m in ("tiny-a1", "tiny-merged")]
        replies = [c.responses.create(model=m, input="Hello world", max_output_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}).output_text for m in ("tiny-a1", "tiny-merged")]
    assert adapter == merged and streamed == adapter
    assert adapter != base and other not in (base, adapter)
    assert answer.model == "tiny-a1"  # the name the client sent
    assert chats[0] == chats[1] and replies[0] == replies[1]  # chat and the Responses API too


def test_the_models_list_shows_each_adapter_with_its_base_as_parent(lora_fleet: FleetProcess) -> None:
    cards = httpx.get(f"{lora_fleet.url}/v1/models", headers={"authorization": f"Bearer {ALL}"}, timeout=10).json()["data"]
    by_id = {c["id"]: c for c in cards}
    assert set(by_id) == {"tiny", "tiny-a1", "tiny-a2", "tiny-merged"}
    assert by_id["tiny-a1"]["parent"] == "tiny" and by_id["tiny-a1"]["root"].endswith("a1")
    assert by_id["tiny"]["parent"] is None and by_id["tiny-a2"]["state"] == "ready"
    one = httpx.get(f"{lora_fleet.url}/v1/models/tiny-a2", headers={"authorization": f"Bearer {ALL}"}, timeout=10)
    assert one.json()["parent"] == "tiny"


def test_a_key_limited_to_one_adapter_gets_403_for_the_other_and_for_the_base(lora_fleet: FleetProcess) -> None:
    with client(lora_fleet, ONLY_A1) as c:
        assert greedy(c, "tiny-a1", 4)
        for model in ("tiny-a2", "tiny"):
            with pytest.raises(openai.PermissionDeniedError):
                greedy(c, model, 4)
        assert [m.id for m in c.models.list().data] == ["tiny-a1"]


def test_an_unknown_adapter_is_a_404_listing_the_adapters(lora_fleet: FleetProcess) -> None:
    with client(lora_fleet) as c, pytest.raises(openai.NotFoundError) as e:
        greedy(c, "tiny-a3", 4)
    message = e.value.response.json()["error"]["message"]
    assert "'tiny-a3' does not exist" in message and "adapters: tiny-a1, tiny-a2" in message


def status(fleet: FleetProcess) -> dict[str, dict[str, Any]]:
    rows = httpx.get(f"{fleet.url}/fleet/status", headers={"authorization": f"Bearer {ALL}"}, timeout=10).json()
    return {r["replica"]: r for r in rows["models"]}


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it_until_the_load_bound_moves_them(
    lora_fleet: FleetProcess,
) -> None:
    with client(lora_fleet) as c:
        greedy(c, "tiny-a2", 2)  # held by a replica from here on, whichever test ran before
        before = status(lora_fleet)
        for _ in range(6):
            greedy(c, "tiny-a2", 2)
        middle = status(lora_fleet)
        hits = {r: middle[r]["routed"].get("adapter_hit", 0) - before[r]["routed"].get("adapter_hit", 0)
                for r in ("tiny.0", "tiny.1")}
        assert sorted(hits.values()) == [0, 6]  # one after another: all on the one that holds it

        together = threading.Barrier(8)

        def stream(_: int) -> int:
            together.wait(timeout=30)  # all eight sent at once, each in flight while the next is routed
            return len(list(c.completions.create(model="tiny-a2", prompt="The capital", max_tokens=48, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})))

        with ThreadPoolExecutor(8) as pool:
            assert all(list(pool.map(stream, range(8))))
    after = status(lora_fleet)
    loaded = {r: after[r]["routed"].get("adapter_loaded", 0) - middle[r]["routed"].get("adapter_loaded", 0)
              for r in ("tiny.0", "tiny.1")}
    holder = max(hits, key=lambda r: hits[r])
    other = "tiny.1" if holder == "tiny.0" else "tiny.0"
    assert loaded[other] >= 1  # eight at once are past the bound: the adapter was loaded on the other replica too


def test_an_adapter_loaded_at_run_time_serves_and_once_unloaded_is_a_404(lora: LoraFleet) -> None:
    url, path = lora.fleet.url, str(lora.tmp / "a3")
    body = {"lora_name": "tiny-a3", "lora_path": path, "model": "tiny"}
    with httpx.Client(base_url=url, timeout=120) as http, client(lora.fleet) as c:
        assert http.post("/v1/load_lora_adapter", json=body).status_code == 401  # the admin key, not an API key
        # never the 500 of pathlib's RuntimeError (an unknown ~user) or OSError (a name longer than a file system holds)
        for bad in (str(lora.tmp / "nope"), "~fleet-no-such-user/a3", "", "/" + "a" * 300, "x/" * 3000):
            refused = http.post("/v1/load_lora_adapter", json={**body, "lora_path": bad},
                                headers={"authorization": f"Bearer {ADMIN}"})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "lora_path", refused.text
        loaded = http.post("/v1/load_lora_adapter", json=body, headers={"authorization": f"Bearer {ADMIN}"})
        assert loaded.status_code == 200 and loaded.json()["parent"] == "tiny"
        assert greedy(c, "tiny-a3") not in (greedy(c, "tiny"), greedy(c, "tiny-a1"))
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "tiny-a3"},
                         headers={"authorization": f"Bearer {ADMIN}"})
        assert gone.status_code == 200
        with pytest.raises(openai.NotFoundError):
            greedy(c, "tiny-a3", 2)


def test_a_reload_that_adds_an_adapter_applies_it_without_restarting_the_engines(lora: LoraFleet) -> None:
    fleet = lora.fleet
    pids = {r: row["pid"] for r, row in status(fleet).items()}
    models = [dict(m) for m in lora.models]
    models[0]["adapters"] = {**models[0]["adapters"], "tiny-a4": str(lora.tmp / "a3")}
    config = lora.tmp / "fleet.toml"
    config.write_text(fleet_toml(models, fleet.port, tables=TABLES))
    done = subprocess.run([str(ROOT / ".venv/bin/fleet"), "reload", "--config", str(config)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "adapters: tiny" in done.stdout and "changed: -" in done.stdout
    assert {r: row["pid"] for r, row in status(fleet).items()} == pids  # no engine restarted
    with client(fleet) as c:
        assert greedy(c, "tiny-a4") not in (greedy(c, "tiny"), greedy(c, "tiny-a1"))


def test_requests_per_adapter_show_in_metrics_fleet_status_and_the_page(lora_fleet: FleetProcess, tmp_path: Path) -> None:
    from browser import Browser

    with client(lora_fleet) as c:
        greedy(c, "tiny-a1", 2)
    metrics = httpx.get(f"{lora_fleet.url}/metrics", headers={"authorization": f"Bearer {ALL}"}, timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith('fleet_adapter_requests_total{adapter="tiny-a1"')]
    assert counted and float(counted[0].split()[-1]) >= 1
    row = status(lora_fleet)["tiny.0"]
    assert row["adapters"]["tiny-a1"] >= 1 and "tiny-a2" in row["adapters"]
    browser = Browser(lora_fleet.url, tmp_path / "profile")
    try:
        page = browser.page
        page.fill("#key", ALL)
        page.click("#key-form button")
        shown = page.wait_for_selector('#engines tr[data-engine="tiny.0"] .adapters')
        assert shown is not None and "tiny-a1" in (shown.text_content() or "")
        assert [e for e in browser.errors if "401" not in e] == []  # the page's first try came without the key
    finally:
        browser.close()
