"""A replica's death costs no request (issue 37): the rules of taking a request over (pure), and the
gateway doing it between real processes, fake engines that die mid-answer (tests/fake_engine.py's
`fake_die_mid_stream_while`). The same with real vLLM engines killed by SIGKILL:
tests/e2e/test_resume.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_engine import expected_text
from fleets import FakeFleets, InProcessFleet, free_ports

from fleet.errors import RequestGivenUp
from fleet.gateway.routing.resume import MAX_DEATHS, Progress, after_death, continuation, why_not_continued
from fleet.wire import protocol

# --- the rules -----------------------------------------------------------------------------------


def request(**sampling: Any) -> protocol.GenerateRequest:
    return protocol.GenerateRequest(request_id="r", prompt="hello there", sampling=protocol.SamplingParams(**sampling))


def progress_after(tokens: int, text: str = "", finish: protocol.FinishReason | None = None) -> Progress:
    p = Progress()
    p.saw([protocol.Prompt(token_ids=[5, 6, 7]),
           protocol.Delta(index=0, text=text, token_ids=list(range(100, 100 + tokens)), finish_reason=finish)])
    return p


def test_a_continuation_prompts_with_the_prompt_and_the_tokens_sent_and_asks_for_what_is_left() -> None:
    req = request(max_tokens=20, min_tokens=5, stop=["\n"], prompt_logprobs=2)
    req.echo = True
    p = progress_after(3, text="abcd")
    cont = after_death(req, p, ["m.0"])
    assert isinstance(cont, protocol.GenerateRequest)
    assert cont.prompt == [5, 6, 7, 100, 101, 102]
    assert (cont.sampling.max_tokens, cont.sampling.min_tokens, cont.sampling.stop) == (17, 2, ["\n"])
    assert cont.sampling.prompt_logprobs is None and not cont.echo  # the client has them already
    assert cont.resume == protocol.Resume(generated=3, text_sent=4)
    assert cont.request_id != req.request_id
    assert continuation(req, p, 2).sampling.min_tokens == 2


def test_nothing_sent_yet_runs_the_same_request_again() -> None:
    req = request(seed=7, temperature=0.9, n=3)
    assert after_death(req, Progress(), ["m.0"]) is req  # seed and all: the answer it would have been


@pytest.mark.parametrize(("fields", "why"), [
    ({"n": 2}, "several choices"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"bad_words": ["x"]}, "bad_words"),
    ({"seed": 3, "temperature": 0.7}, "a seed and temperature > 0"),
    ({"structured": protocol.Structured(regex="a+")}, "structured outputs"),
])
def test_a_stream_that_cannot_go_on_exactly_is_given_up_naming_why(fields: dict[str, Any], why: str) -> None:
    req = request(**fields)
    assert why in (why_not_continued(req) or "")
    with pytest.raises(RequestGivenUp, match=why) as e:
        after_death(req, progress_after(2), ["m.1"])
    assert "m.1" in e.value.message and e.value.status == 502


def test_beam_search_tools_and_reasoning_cannot_go_on_mid_stream() -> None:
    beam = request()
    beam.beam = protocol.BeamSearch(width=2)
    tools = request()
    tools.tools = protocol.ToolUse(mode="auto")
    thinking = request()
    thinking.reasoning = True
    assert [why_not_continued(r) is not None for r in (beam, tools, thinking)] == [True] * 3
    assert why_not_continued(request(seed=3, temperature=0)) is None  # greedy: the seed draws nothing


def test_a_request_under_which_two_engines_died_is_not_sent_to_a_third() -> None:
    assert MAX_DEATHS == 2
    with pytest.raises(RequestGivenUp, match=r"m\.0, m\.1") as e:
        after_death(request(), Progress(), ["m.0", "m.1"])
    assert "kills" in e.value.message


def test_an_answer_that_had_finished_gets_its_done_and_goes_nowhere() -> None:
    done = after_death(request(), progress_after(4, finish="stop"), ["m.0"])
    assert done == protocol.Done(prompt_tokens=3, completion_tokens=4)


def test_a_continuations_frames_read_as_one_answer() -> None:
    p = progress_after(3)
    after_death(request(max_tokens=10), p, ["m.0"])
    carried = p.carry([protocol.Prompt(token_ids=[5, 6, 7, 100, 101, 102]), protocol.Delta(index=0, text="x", token_ids=[9]),
                       protocol.Done(prompt_tokens=6, completion_tokens=7, cached_tokens=6)])
    assert [type(f) for f in carried] == [protocol.Delta, protocol.Done]  # no second Prompt
    assert carried[-1] == protocol.Done(prompt_tokens=3, completion_tokens=10, cached_tokens=3)


# --- through the gateway, fake engines dying mid-answer ------------------------------------------


def two_replicas(fake_fleet: FakeFleets, tmp_path: Path, deaths: int = 1, health_interval: float = 0.2,
                 **args: Any) -> tuple[InProcessFleet, Path]:
    die = tmp_path / "die"
    engine_args = {"fake_token_delay": 0.02, "fake_die_mid_stream_while": str(die), "fake_max_model_len": 256, **args}
    fleet = fake_fleet({"name": "m", "replicas": 2, "port": free_ports(2), "engine_args": engine_args},
                       supervisor={"restart_backoff": 0.2, "restart_backoff_max": 0.4, "health_interval": health_interval})
    die.write_text(str(deaths))
    return fleet, die


def stream(fleet: InProcessFleet, **body: Any) -> tuple[list[dict[str, Any]], str]:
    """The events of a streamed completion, and the text of choice 0."""
    events = []
    with httpx.stream("POST", f"{fleet.url}/v1/completions", timeout=30, json={
            "model": "m", "prompt": "one two three", "max_tokens": 10, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **body}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices") and e["choices"][0]["index"] == 0)
    return events, text


def taken_over(fleet: InProcessFleet) -> dict[str, int]:
    return fleet.fleet.control.status().models[0].taken_over


def test_a_stream_whose_engine_dies_goes_on_from_another_replica_as_one_stream(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    fleet, die = two_replicas(fake_fleet, tmp_path)
    events, text = stream(fleet)
    assert not die.exists()  # an engine died under it
    assert text == expected_text(10)  # every token once, in order: the fake went on at the 4th, told of 3
    assert "error" not in json.dumps(events)
    usage = events[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 10)
    running = [e["usage"]["completion_tokens"] for e in events if e.get("choices")]
    assert running == list(range(1, 11))  # continuous usage counts on across the seam
    assert taken_over(fleet) == {"rerun": 0, "resumed": 1, "given_up": 0}
    metrics = httpx.get(f"{fleet.url}/metrics", timeout=5).text
    assert 'fleet_requests_taken_over_total{model="m",outcome="resumed"} 1.0' in metrics


def test_a_whole_answer_whose_engine_dies_is_run_again_on_another_replica(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    fleet, die = two_replicas(fake_fleet, tmp_path)
    r = httpx.post(f"{fleet.url}/v1/completions", timeout=30,
                   json={"model": "m", "prompt": "one two three", "max_tokens": 10, "logprobs": 1})
    assert r.status_code == 200, r.text
    assert not die.exists()
    body = r.json()
    assert body["choices"][0]["text"] == expected_text(10)
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 10
    assert body["usage"]["completion_tokens"] == 10
    assert taken_over(fleet) == {"rerun": 1, "resumed": 0, "given_up": 0}


def test_a_stream_of_several_choices_whose_engine_dies_ends_with_an_error_naming_why(
        fake_fleet: FakeFleets, tmp_path: Path) -> None:
    fleet, _ = two_replicas(fake_fleet, tmp_path)
    events, _ = stream(fleet, n=2)
    assert "error" in events[-1], events[-1]
    assert "several choices" in events[-1]["error"]["message"]
    assert events[-1]["error"]["code"] == "engine_error"
    assert taken_over(fleet) == {"rerun": 0, "resumed": 0, "given_up": 1}


def test_a_request_that_kills_two_engines_fails_naming_them_and_reaches_no_third(
        fake_fleet: FakeFleets, tmp_path: Path) -> None:
    fleet, die = two_replicas(fake_fleet, tmp_path, deaths=5)
    r = httpx.post(f"{fleet.url}/v1/completions", timeout=30, json={"model": "m", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 502
    error = r.json()["error"]
    assert error["code"] == "engine_error" and "m.0" in error["message"] and "m.1" in error["message"]
    assert die.read_text() == "3"  # two deaths, not a third
    assert taken_over(fleet) == {"rerun": 1, "resumed": 0, "given_up": 1}


def test_an_engine_whose_vllm_core_dies_is_lost_like_one_whose_process_dies(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    fleet, die = two_replicas(fake_fleet, tmp_path, fake_core_dies=True)
    _, text = stream(fleet)
    assert not die.exists() and text == expected_text(10)
    assert taken_over(fleet)["resumed"] == 1


def test_one_replica_has_no_other_to_take_over_and_says_so(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    die = tmp_path / "die"
    die.write_text("1")
    fleet = fake_fleet({"name": "m", "engine_args": {"fake_die_mid_stream_while": str(die), "fake_max_model_len": 256}})
    r = httpx.post(f"{fleet.url}/v1/completions", timeout=30, json={"model": "m", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 502
    assert "no other replica" in r.json()["error"]["message"]


def test_the_status_page_shows_the_requests_taken_over_beside_the_restarts(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    from browser import Browser

    fleet, _ = two_replicas(fake_fleet, tmp_path)
    stream(fleet)
    browser = Browser(fleet.url, tmp_path / "profile")
    try:
        shown = browser.page.wait_for_selector('#engines tr[data-engine="m.1"] .takeovers')
        assert shown is not None and (shown.text_content() or "") == "resumed 1 · re-run 0 · lost 0"
        assert browser.errors == []
    finally:
        browser.close()


def test_a_replica_whose_engine_died_leaves_rotation_at_once_not_after_its_last_log_lines(
        fake_fleet: FakeFleets, tmp_path: Path) -> None:
    """Its grandchild holds the output pipe open, so the last lines take a second to come; routing
    must not send requests to the dead engine meanwhile (they would be refused)."""
    import os
    import signal
    import time

    fleet, die = two_replicas(fake_fleet, tmp_path, health_interval=5, fake_spawn_child=True)
    die.unlink()  # no death but the one below
    transitions = fleet.transitions("m.0")
    killed_at = time.monotonic()
    os.kill(fleet.fleet.owners["m.0"].pid, signal.SIGKILL)  # type: ignore[arg-type]
    seen = transitions.wait(lambda states: "failed" in states, "it failed")
    assert transitions.at[seen.index("failed")] - killed_at < 0.5
    for _ in range(10):  # meanwhile and after: every request served by the other replica
        r = httpx.post(f"{fleet.url}/v1/completions", timeout=30, json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_a_chat_stream_and_a_responses_stream_go_on_as_one_too(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    import openai

    fleet, die = two_replicas(fake_fleet, tmp_path)
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as sdk:
        chunks = list(sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                                  stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected_text(10) and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
        assert not die.exists()
        fleet.wait_state("m.0", "ready")
        fleet.wait_state("m.1", "ready")
        die.write_text("1")  # one death under the next stream too
        events = list(sdk.responses.create(model="m", input="hi", max_output_tokens=10, stream=True))
        assert events[-1].type == "response.incomplete"  # max_output_tokens reached, as OpenAI says it
        assert events[-1].response.output_text == expected_text(10)
        assert not any(e.type == "error" for e in events)
    assert not die.exists() and taken_over(fleet)["resumed"] == 2
