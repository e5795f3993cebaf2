"""A model started on demand and stopped when idle, on a real vLLM CPU engine through `fleet
launch`: no engine until the first request, which waits for the start and streams its answer;
stopped (every process gone) after its idle time; started again by the next request, which gets
the same greedy answer."""

from __future__ import annotations

import re
import time
from pathlib import Path

import openai
import psutil
from fleets import TINY, FleetProcess, free_port, running_fleet, wait_until

IDLE_AFTER = 2.0


def engines(fleet: FleetProcess) -> list[psutil.Process]:
    """The launcher's descendants: the engine and vLLM's own processes (none while idle)."""
    return [p for p in fleet.descendants() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_model_on_demand_starts_on_its_first_request_stops_when_idle_and_starts_again(
    tmp_path: Path, tiny_model: Path,
) -> None:
    model = {"name": "lazy", "source": str(tiny_model), "port": free_port(), **TINY,
             "start": "on_demand", "when_idle": "stop", "idle_after": IDLE_AFTER}
    with running_fleet([model], tmp_path) as fleet, \
            openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0, timeout=300) as client:
        assert fleet.states() == {"lazy": "idle"} and engines(fleet) == []
        asked = time.monotonic()
        stream = client.completions.create(model="lazy", prompt="Hello world", max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
        chunks = list(stream)
        pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices]
        waited = time.monotonic() - asked
        started_in = [float(s) for s in re.findall(r"lazy: ready in ([\d.]+)s", fleet.log())]
        # the answer's 8 tokens, by its usage: a stream that falls behind carries two steps in one chunk
        assert len(started_in) == 1 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        assert waited < started_in[0] + 5  # the engine's start and the answer; what the gateway adds: bench/on_demand.py
        assert fleet.states() == {"lazy": "ready"} and engines(fleet)

        wait_until(lambda: fleet.states() == {"lazy": "idle"}, "stopped after its idle time", timeout=30)
        wait_until(lambda: engines(fleet) == [], "every engine process gone", timeout=30)
        assert "lazy: stopped while idle" in fleet.log()

        again = client.completions.create(model="lazy", prompt="Hello world", max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert again.choices[0].text == "".join(pieces)  # the same engine settings, the same greedy answer
        assert len(re.findall(r"lazy: ready in", fleet.log())) == 2
