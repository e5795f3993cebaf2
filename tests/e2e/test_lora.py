"""LoRA adapters as model names (issue 34), on a real vLLM CPU engine through `fleet launch`: two
real PEFT adapters of the tiny model (random non-zero weights), served by the base's one engine.
The strongest check that the adapter, not something else, was applied: its greedy answer differs
from the base's and equals that of the same adapter merged into the base's weights and served as a
model of its own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fleets import TINY, FleetProcess, free_port, running_fleet
from tiny_model import write_lora_adapter, write_merged_model

ALL, ONLY_A1 = "sk-all", "sk-only-a1"


@pytest.fixture(scope="module")
def lora_fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[FleetProcess]:
    tmp = tmp_path_factory.mktemp("lora")
    a1 = write_lora_adapter(tiny_model, tmp / "a1", seed=1)
    a2 = write_lora_adapter(tiny_model, tmp / "a2", seed=2)
    merged = write_merged_model(tiny_model, a1, tmp / "merged-a1")
    models = [
        {"name": "tiny", "source": str(tiny_model), "port": free_port(), **TINY,
         "adapters": {"tiny-a1": str(a1), "tiny-a2": str(a2)}, "max_lora_rank": 8},
        {"name": "tiny-merged", "source": str(merged), "port": free_port(), **TINY},
    ]
    keys = f'[auth]\nkeys = ["{ALL}", {{ key = "{ONLY_A1}", models = ["tiny-a1"] }}]\n'
    with running_fleet(models, tmp, tables=keys) as fleet:
        yield fleet


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
    assert adapter == merged and streamed == adapter
    assert adapter != base and other not in (base, adapter)
    assert answer.model == "tiny-a1"  # the name the client sent


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
