"""Three models that take turns in one set ([[sets]], one awake at once), on real vLLM CPU engines
through `fleet launch`: requests alternating between them all succeed and never two of their
engines run at once (counted processes); a stream in flight on the awake model finishes whole while
a request for another waits; `fleet sleep` and `fleet wake` on the command line. The CPU build has
no sleep mode: a member put away stops, and the next request starts it again."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import openai
import psutil
from fleets import ROOT, TINY, FleetProcess, free_port, running_fleet

NAMES = ["tiny-1", "tiny-2", "tiny-3"]


def engines(fleet: FleetProcess) -> list[psutil.Process]:
    """The launcher's own children that live: one per running engine (vLLM's processes are theirs)."""
    try:
        children = psutil.Process(fleet.proc.pid).children()
    except psutil.Error:
        return []
    alive = []
    for p in children:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


@contextmanager
def census(fleet: FleetProcess) -> Iterator[list[int]]:
    """The number of live engines, sampled every 20 ms while the block runs."""
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            counts.append(len(engines(fleet)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield counts
    finally:
        done.set()
        sampler.join()


def fleet_cli(*args: str) -> str:
    done = subprocess.run([str(ROOT / ".venv/bin/fleet"), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def greedy(client: openai.OpenAI, model: str, tokens: int = 6) -> str:
    return client.completions.create(model=model, prompt="Hello world", max_tokens=tokens, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_three_models_take_turns_in_a_set_of_one_and_never_run_two_engines_at_once(
    tmp_path: Path, tiny_model: Path,
) -> None:
    own = tmp_path / "tiny-1"  # tiny-1's own copy of the weights, to break its start later
    shutil.copytree(tiny_model, own)
    sources = {"tiny-1": own, "tiny-2": tiny_model, "tiny-3": tiny_model}
    models = [{"name": n, "source": str(sources[n]), "port": free_port(), "start": "on_demand", **TINY} for n in NAMES]
    sets = f'[[sets]]\nname = "desk"\nmodels = {NAMES!r}\nmin_awake = 0\n'.replace("'", '"')
    with running_fleet(models, tmp_path, tables=sets) as fleet, \
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        assert fleet.states() == dict.fromkeys(NAMES, "idle") and engines(fleet) == []
        with census(fleet) as counts:
            answers = {n: greedy(client, n) for n in NAMES}
            assert greedy(client, "tiny-1") == answers["tiny-1"]  # started again, the same greedy answer
            assert fleet.states() == {"tiny-1": "ready", "tiny-2": "idle", "tiny-3": "idle"}

            # a stream on the awake model finishes whole while a request for another waits for it
            with ThreadPoolExecutor(1) as pool:
                stream = client.completions.create(model="tiny-1", prompt="Hello world", max_tokens=40, temperature=0,
                                                   stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True})
                chunks = [next(iter(stream))]  # under way
                other = pool.submit(greedy, client, "tiny-2")
                chunks += list(stream)
                assert other.result() == answers["tiny-2"]
            assert chunks[-1].usage.completion_tokens == 40  # whole: drained, not cut
            assert chunks[-2].choices[0].finish_reason == "length"
        assert counts and max(counts) == 1, f"engines at once: {sorted(set(counts))}"
        assert fleet.log().count("tiny-1: stopped while idle") == 2  # put away twice to make room

        config = str(tmp_path / "fleet.toml")
        assert fleet_cli("sleep", "tiny-2", "--config", config).strip() == "tiny-2: idle"
        assert engines(fleet) == []
        assert fleet_cli("wake", "tiny-3", "--config", config).strip() == "tiny-3: ready"
        assert fleet.states() == {"tiny-1": "idle", "tiny-2": "idle", "tiny-3": "ready"}
        status = fleet_cli("status", "--config", config)
        assert "tiny-3" in status and "idle" in status

        # twenty requests at once for a member that is away: one start (after tiny-3 went), all answered
        starts = fleet.log().count("tiny-2: ready in")
        with ThreadPoolExecutor(20) as pool:
            assert list(pool.map(lambda _: greedy(client, "tiny-2"), range(20))) == [answers["tiny-2"]] * 20
        assert fleet.log().count("tiny-2: ready in") == starts + 1

        # a member whose engine cannot start: its waiting requests get a 503 naming it; the next one tries again
        config_json = own / "config.json"
        good = config_json.read_text()
        config_json.write_text("{ not json")
        with ThreadPoolExecutor(2) as pool:
            failures = list(pool.map(lambda _: _status_and_error(client, "tiny-1"), range(2)))
        for status_code, message in failures:
            assert status_code == 503 and "'tiny-1' failed to start" in message and "the next request tries again" in message
        assert fleet.states()["tiny-1"] == "idle"
        config_json.write_text(good)
        assert greedy(client, "tiny-1") == answers["tiny-1"]


def _status_and_error(client: openai.OpenAI, model: str) -> tuple[int, str]:
    try:
        greedy(client, model)
    except openai.APIStatusError as e:
        return e.status_code, e.response.json()["error"]["message"]
    return 200, ""
