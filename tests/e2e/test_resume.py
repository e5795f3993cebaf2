"""A replica's death costs no request (issue 37), on real vLLM engines on the CPU through the real
launcher, with the openai SDK: two replicas of the tiny model, 8 clients (half streamed, all
greedy) while one replica's engine after the other is killed with SIGKILL; every answer, whole or
streamed, is token for token the undisturbed fleet's, its usage adds up, and none fails. A prompt
that kills its engine (the engines' FLEET_TEST_DIE_ON fault: engine/service.py) is tried on two
replicas and fails naming them."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fleets import TINY, FleetProcess, free_ports, running_fleet, status, wait_replicas

from fleet.engine.service import DIE_ON_ENV

POISON = "POISONPILL"
PROMPTS = [f"The capital of {c} is" for c in ("France", "Germany", "Italy", "Spain", "Peru", "Chad", "Iran", "Fiji")]
TOKENS = 48


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[FleetProcess]:
    model = {"name": "tiny", "source": str(tiny_model), "port": free_ports(2), "replicas": 2, **TINY}
    tables = "[supervisor]\nrestart_backoff = 0.5\nhealth_interval = 0.5\nmax_restarts = 20\n"
    with running_fleet([model], tmp_path_factory.mktemp("resume"), ready_timeout=600, tables=tables,
                       env={DIE_ON_ENV: POISON}) as f:
        wait_replicas(f, "ready", timeout=600)
        yield f


def ask(sdk: openai.OpenAI, prompt: str, stream: bool) -> tuple[str, int, int]:
    """A greedy answer's text, prompt tokens and completion tokens (a stream's from its usage chunk)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
    if not stream:
        r = sdk.completions.create(**body)
        assert r.usage is not None
        return r.choices[0].text, r.usage.prompt_tokens, r.usage.completion_tokens
    text, usage = "", None
    for chunk in sdk.completions.create(**body, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None
    return text, usage.prompt_tokens, usage.completion_tokens


def running(fleet: FleetProcess, not_pids: tuple[int, ...] = ()) -> dict[str, dict]:
    """Until both replicas serve, each from a live process (not one of `not_pids`): the gateway sees a
    dead engine as such within a second, its row ready with no pid meanwhile."""
    deadline = time.monotonic() + 300
    while True:
        rows = status(fleet)
        if all(r["state"] == "ready" and r["pid"] not in (None, *not_pids) for r in rows.values()):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.5)


def taken_over(fleet: FleetProcess) -> dict[str, int]:
    return next(iter(status(fleet).values()))["taken_over"]


def test_killing_replicas_under_eight_clients_fails_no_request_and_changes_no_token(fleet: FleetProcess) -> None:
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=120) as sdk:
        expected = {p: ask(sdk, p, stream=False) for p in PROMPTS}  # the undisturbed fleet's
        assert all(c == TOKENS for _, _, c in expected.values())
    before = taken_over(fleet)
    stop = threading.Event()
    answers: list[tuple[str, bool, tuple[str, int, int] | str]] = []

    def client(i: int) -> None:
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=120) as sdk:
            k = 0
            while not stop.is_set():
                prompt, stream, k = PROMPTS[(i + k) % len(PROMPTS)], i % 2 == 0, k + 1
                try:
                    answers.append((prompt, stream, ask(sdk, prompt, stream)))
                except openai.APIError as e:
                    answers.append((prompt, stream, f"{type(e).__name__}: {e}"))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    kills = []
    try:
        for victim in ("tiny.0", "tiny.1", "tiny.0"):
            rows = running(fleet)  # never both down: one always takes over
            time.sleep(1.0)  # a second of traffic on both first (8 clients: streams are always in flight)
            os.kill(rows[victim]["pid"], signal.SIGKILL)
            kills.append(victim)
            deadline = time.monotonic() + 30
            while status(fleet)[victim]["state"] == "ready" and time.monotonic() < deadline:
                time.sleep(0.2)  # until the gateway saw it die
        running(fleet)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    failed = [(p, s, a) for p, s, a in answers if isinstance(a, str)]
    assert failed == [], failed[:5]
    wrong = [(p, s, a) for p, s, a in answers if a != expected[p]]  # text, prompt and completion tokens
    assert wrong == [], wrong[:3]
    assert sum(1 for _, s, _ in answers if s) > 20 and sum(1 for _, s, _ in answers if not s) > 20
    after = taken_over(fleet)
    resumed, rerun = after["resumed"] - before["resumed"], after["rerun"] - before["rerun"]
    assert resumed + rerun >= len(kills), (before, after)  # each death caught requests mid-answer
    assert resumed >= 1 and after["given_up"] == before["given_up"]
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=10).text
    assert f'fleet_requests_taken_over_total{{model="tiny",outcome="resumed"}} {float(after["resumed"])}' in metrics


def test_a_prompt_that_kills_its_engine_is_tried_on_two_replicas_and_fails_naming_them(fleet: FleetProcess) -> None:
    pids = {name: row["pid"] for name, row in running(fleet).items()}
    before = taken_over(fleet)
    with (openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=120) as sdk,
          pytest.raises(openai.APIError) as e):
        for _ in sdk.completions.create(model="tiny", prompt=f"{POISON} says", max_tokens=TOKENS, temperature=0,
                                        stream=True):
            pass
    assert "tiny.0" in str(e.value) and "tiny.1" in str(e.value), e.value
    assert "kills 2 engines" in str(e.value)
    running(fleet, not_pids=tuple(pids.values()))  # both restarted; no third attempt anywhere
    taken = taken_over(fleet)
    assert taken["given_up"] == before["given_up"] + 1
    assert taken["resumed"] == before["resumed"] + 1  # the first death: its stream went on, and killed the second
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=120) as sdk:
        assert ask(sdk, PROMPTS[0], stream=True)[2] == TOKENS  # and the fleet serves on
