"""The status page's server side (/ui, its event stream, its actions) on fleets of fake engines;
the page itself runs in a real browser against real engines in tests/e2e/test_operations.py."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import Browser
from fleets import FakeFleets, InProcessFleet, free_port

from fleet.config.schema import FleetConfig
from fleet.config.show import MASK, effective_toml
from fleet.gateway.model import ServedModel
from fleet.gateway.recent import Recent, Trace, prompt_preview
from fleet.gateway.routing.replicas import Replica
from fleet.gateway.ui.gpus import Gpus
from fleet.gateway.ui.history import History
from fleet.lifecycle import EngineState, Lifecycle
from fleet.run.journal import Journal

ADMIN = "admin-secret"
FAST = {"restart_backoff": 0.2, "health_interval": 0.2}


class Events:
    """An open /ui/events stream, read event by event."""

    def __init__(self, url: str, key: str | None = None) -> None:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=30)
        self.response = self.client.send(self.client.build_request("GET", url + "/ui/events", headers=headers),
                                         stream=True)
        self.lines = self.response.iter_lines()

    def next(self) -> tuple[str, Any]:
        name, data = "message", ""
        for line in self.lines:
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data += line[6:]
            elif line == "" and data:
                return name, json.loads(data)
        raise AssertionError("the stream ended")

    def until(self, check: Callable[[str, Any], bool], what: str, timeout: float = 20) -> tuple[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            name, data = self.next()
            if check(name, data):
                return name, data
        raise AssertionError(f"no event {what} within {timeout}s")

    def close(self) -> None:
        self.response.close()
        self.client.close()


@pytest.fixture
def events() -> Iterator[Callable[..., Events]]:
    opened: list[Events] = []

    def open_(url: str, key: str | None = None) -> Events:
        opened.append(Events(url, key))
        return opened[-1]

    yield open_
    for e in opened:
        e.close()


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets) -> InProcessFleet:
    """Two replicas of one model and a second model; an admin key; prompts shown."""
    return module_fake_fleet({"name": "alpha", "replicas": 2}, {"name": "beta"}, supervisor=FAST,
                             ui={"admin_key": ADMIN, "show_prompts": True})


def complete(url: str, model: str, prompt: str = "one two three", stream: bool = False, **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 3,
                                                       "stream": stream, **extra}, timeout=30)


def act(url: str, path: str, key: str | None = ADMIN) -> httpx.Response:
    return httpx.post(url + path, headers={"authorization": f"Bearer {key}"} if key else {}, timeout=30)


def status_rows(fleet: InProcessFleet) -> dict[str, dict[str, Any]]:
    return {m["replica"]: m for m in httpx.get(fleet.url + "/fleet/status", timeout=10).json()["models"]}


# --- the page and its files --------------------------------------------------------------------


def test_the_page_and_its_files_are_served_from_the_package(fleet: InProcessFleet) -> None:
    page = httpx.get(fleet.url + "/ui", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/ui/static/ui.js"' in page.text and "<table id=\"engines\">" in page.text
    for name, kind in (("ui.js", "text/javascript"), ("ui.css", "text/css")):
        r = httpx.get(f"{fleet.url}/ui/static/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000
    missing = httpx.get(fleet.url + "/ui/static/secret.py", timeout=10)
    assert missing.status_code == 400 and missing.json()["error"]["message"] == "no such file: secret.py"


def test_the_stream_starts_with_everything_the_page_needs(fleet: InProcessFleet, events: Callable[..., Events]) -> None:
    stream = events(fleet.url)
    name, hello = stream.next()
    assert name == "hello" and hello["can_act"] is True and hello["show_prompts"] is True
    assert hello["gateway"]["port"] == fleet.config.gateway.port
    assert '[ui]\nadmin_key = "********"' in hello["config"] and ADMIN not in hello["config"]
    name, status = stream.next()
    assert name == "status"
    assert {m["replica"]: m["state"] for m in status["models"]} == {"alpha.0": "ready", "alpha.1": "ready", "beta": "ready"}
    seen = {}
    while len(seen) < 5:
        name, data = stream.next()
        seen[name] = data
    assert set(seen) == {"history", "sample", "changes", "logs", "requests"}
    went = [(c["engine"], c["old"], c["new"]) for c in seen["changes"]]
    assert ("beta", "stopped", "starting") in went and ("beta", "starting", "ready") in went
    assert any(line[1] == "beta" and line[3].startswith("fleet: ready in") for line in seen["logs"])


def test_a_finished_request_reaches_open_pages_with_its_replica_tokens_and_times(
    fleet: InProcessFleet, events: Callable[..., Events]
) -> None:
    stream = events(fleet.url)
    assert complete(fleet.url, "beta", "the quick brown fox", stream=True).status_code == 200
    _, traces = stream.until(lambda n, d: n == "requests" and any(t["prompt"] == "the quick brown fox" for t in d),
                             "with the request")
    trace = next(t for t in traces if t["prompt"] == "the quick brown fox")
    assert trace["model"] == "beta" and trace["replica"] == "beta" and trace["route"] == "completions"
    assert trace["status"] == 200 and trace["prompt_tokens"] == 4 and trace["completion_tokens"] == 3
    assert 0 < trace["ttft_ms"] <= trace["duration_ms"]


def test_a_request_refused_before_it_ran_is_listed_with_its_status(fleet: InProcessFleet, events: Callable[..., Events]) -> None:
    stream = events(fleet.url)
    assert complete(fleet.url, "beta", "refused one", best_of=1, n=2).status_code == 400
    _, traces = stream.until(lambda n, d: n == "requests" and any(t["prompt"] == "refused one" for t in d), "refused")
    trace = next(t for t in traces if t["prompt"] == "refused one")
    assert trace["status"] == 400 and trace["replica"] == "" and trace["completion_tokens"] == 0


def test_samples_count_each_replicas_requests_per_minute(fleet: InProcessFleet, events: Callable[..., Events]) -> None:
    stream = events(fleet.url)
    for _ in range(6):
        assert complete(fleet.url, "beta").status_code == 200
    # the last request's engine side ends just after its client has the answer: a sample may be taken between
    _, sample = stream.until(lambda n, d: n == "sample" and d["points"].get("beta", [0] * 6)[4] > 0
                             and d["points"]["beta"][2] == 0, "with beta's requests, none in flight")
    at, tokens, inflight, queued, per_minute, errors = sample["points"]["beta"]
    assert per_minute >= 6 * 60 / 30 and errors == 0.0 and inflight == 0 and queued == 0
    assert tokens > 0 and abs(at - time.time()) < 10


def test_a_request_the_engine_fails_counts_against_its_replica_and_its_error_share(
    fake_fleet: FakeFleets, events: Callable[..., Events]
) -> None:
    f = fake_fleet({"name": "shaky", "engine_args": {"fake_error_mid_stream": 1}})
    stream = events(f.url)
    answer = complete(f.url, "shaky", stream=True)
    assert answer.status_code == 200 and '"error"' in answer.text  # the error event, after the first token
    _, sample = stream.until(lambda n, d: n == "sample" and d["points"].get("shaky", [0] * 6)[5] > 0, "the failure")
    assert sample["points"]["shaky"][5] == 1.0
    assert status_rows(f)["shaky"]["errors"] == 1


# --- actions -------------------------------------------------------------------------------------


def test_actions_need_the_admin_key(fleet: InProcessFleet) -> None:
    before = status_rows(fleet)["beta"]["pid"]
    missing = act(fleet.url, "/ui/engines/beta/restart", key=None)
    assert missing.status_code == 401 and missing.json()["error"]["message"].startswith("missing admin key")
    wrong = act(fleet.url, "/ui/engines/beta/restart", key="guess")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert status_rows(fleet)["beta"]["pid"] == before
    unknown = act(fleet.url, "/ui/engines/gamma/restart")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "engine"
    bad = act(fleet.url, "/ui/engines/beta/explode")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "action"


def test_restart_stops_the_engine_and_starts_it_anew(fleet: InProcessFleet, events: Callable[..., Events]) -> None:
    stream = events(fleet.url)
    stream.until(lambda n, _: n == "requests", "the end of what was there before")
    before = status_rows(fleet)["beta"]
    assert act(fleet.url, "/ui/engines/beta/restart").status_code == 200
    went: list[tuple[str, str]] = []

    def ready_again(name: str, data: Any) -> bool:
        if name == "changes":
            went.extend((c["old"], c["new"]) for c in data if c["engine"] == "beta")
        return ("starting", "ready") in went

    stream.until(ready_again, "beta ready again")
    assert went[-3:] == [("ready", "stopping"), ("stopping", "starting"), ("starting", "ready")]
    after = status_rows(fleet)["beta"]
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    assert complete(fleet.url, "beta").status_code == 200


def test_a_drained_replica_gets_no_new_requests_until_resumed(fleet: InProcessFleet) -> None:
    assert act(fleet.url, "/ui/engines/alpha.0/drain").status_code == 200
    try:
        assert status_rows(fleet)["alpha.0"]["draining"] is True
        before = status_rows(fleet)
        for _ in range(8):
            assert complete(fleet.url, "alpha").status_code == 200
        after = status_rows(fleet)
        assert after["alpha.0"]["requests"] == before["alpha.0"]["requests"]
        assert after["alpha.1"]["requests"] == before["alpha.1"]["requests"] + 8
    finally:
        assert act(fleet.url, "/ui/engines/alpha.0/resume").status_code == 200
    assert status_rows(fleet)["alpha.0"]["draining"] is False
    for _ in range(8):
        complete(fleet.url, "alpha")
    assert status_rows(fleet)["alpha.0"]["requests"] > after["alpha.0"]["requests"]


def test_reload_from_the_page_applies_the_file(fake_fleet: FakeFleets) -> None:
    f = fake_fleet({"name": "solo"}, ui={"admin_key": ADMIN})
    f.fleet.loader = lambda: f.config  # the file, unchanged
    r = act(f.url, "/ui/reload")
    assert r.status_code == 200 and r.json()["unchanged"] == ["solo"]


def test_a_fleet_without_an_admin_key_has_a_read_only_page(fake_fleet: FakeFleets, events: Callable[..., Events],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEET_ADMIN_KEY", raising=False)
    f = fake_fleet({"name": "solo"})
    _, hello = events(f.url).next()
    assert hello["can_act"] is False and hello["show_prompts"] is False
    refused = act(f.url, "/ui/engines/solo/restart", key="anything")
    assert refused.status_code == 403 and "read-only" in refused.json()["error"]["message"]
    assert complete(f.url, "solo", "private words").status_code == 200
    stream = events(f.url)
    _, traces = stream.until(lambda n, d: n == "requests" and d, "the request")
    assert traces[-1]["prompt"] is None  # prompts are not shown unless [ui] show_prompts


def test_the_admin_key_may_come_from_the_environment(fake_fleet: FakeFleets, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_ADMIN_KEY", "from-env")
    f = fake_fleet({"name": "solo"}, ui={"admin_key": "from-file"})
    assert act(f.url, "/ui/engines/solo/drain", key="from-file").status_code == 401
    assert act(f.url, "/ui/engines/solo/drain", key="from-env").status_code == 200


def test_with_api_keys_the_stream_needs_an_all_models_key_or_the_admin_key(
    fake_fleet: FakeFleets, events: Callable[..., Events]
) -> None:
    f = fake_fleet({"name": "solo"}, {"name": "other"}, ui={"admin_key": ADMIN},
                   auth={"keys": ["sk-all", {"key": "sk-solo", "models": ["solo"]}]})
    assert httpx.get(f.url + "/ui", timeout=10).status_code == 200  # the page holds no data
    assert events(f.url).response.status_code == 401
    limited = events(f.url, "sk-solo").response
    assert limited.status_code == 403
    limited.read()
    assert "every model" in limited.json()["error"]["message"]
    for key in ("sk-all", ADMIN):
        name, _ = events(f.url, key).next()
        assert name == "hello"
    # an API key is not the admin key
    assert act(f.url, "/ui/engines/solo/restart", key="sk-all").status_code == 401


def test_an_engine_fleet_did_not_start_cannot_be_restarted_from_the_page(fake_fleet: FakeFleets) -> None:
    port = free_port()  # nothing listens there: it stays failed, which does not matter here
    f = fake_fleet({"name": "far", "url": f"http://127.0.0.1:{port}", "port": port}, ready=[], ui={"admin_key": ADMIN})
    refused = act(f.url, "/ui/engines/far/restart")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "engine"
    assert "started elsewhere" in refused.json()["error"]["message"]
    assert status_rows(f)["far"]["attached"] is True


def test_restart_brings_back_an_engine_that_used_up_its_restarts(fake_fleet: FakeFleets) -> None:
    f = fake_fleet({"name": "flaky", "engine_args": {"fake_exit_at_start": 3}}, ready=[],
                   supervisor={"restart_backoff": 0.05, "max_restarts": 1})
    seen = f.transitions("flaky")
    seen.wait(lambda s: s.count("failed") == 2, "failed for good after one restart")
    assert f.state("flaky") == "failed"
    assert act(f.url, "/ui/engines/flaky/restart", key=None).status_code == 403  # no admin key here
    f.call(_restart(f, "flaky"))
    seen.wait(lambda s: s.count("starting") == 3, "started again after the restart asked")


async def _restart(f: InProcessFleet, name: str) -> None:
    f.fleet.control.restart(name)


def test_the_page_reconnects_to_a_restarted_gateway_and_shows_the_new_fleet(fake_fleet: FakeFleets, tmp_path: Path) -> None:
    port = free_port()
    first = fake_fleet({"name": "before"}, gateway={"port": port})
    browser = Browser(first.url, tmp_path / "profile")
    try:
        page = browser.page
        page.wait_for_selector('#engines tr[data-engine="before"]')
        first.stop()
        fake_fleet.started.remove(first)
        page.wait_for_selector("#connection[data-state=reconnecting]")
        fake_fleet({"name": "after"}, gateway={"port": port})
        page.wait_for_selector('#engines tr[data-engine="after"]')
        page.wait_for_selector('#engines tr[data-engine="before"]', state="detached")
        assert page.get_attribute("#connection", "data-state") == "live"
        assert page.evaluate("window.notReloaded") is True
        # while the gateway was down, the browser said each refused connection; nothing else went wrong
        assert [e for e in browser.errors if "ERR_CONNECTION_REFUSED" not in e] == []
    finally:
        browser.close()


def test_the_page_fits_a_narrow_window_and_its_actions_are_reached_by_keyboard(
    fleet: InProcessFleet, tmp_path: Path
) -> None:
    browser = Browser(fleet.url, tmp_path / "profile")
    try:
        page = browser.page
        page.set_viewport_size({"width": 360, "height": 800})
        page.wait_for_selector('#engines tr[data-engine="beta"]')
        # the page never scrolls sideways: each wide table scrolls inside its own box
        assert page.evaluate("document.documentElement.scrollWidth") <= 360
        assert page.evaluate("document.querySelector('#engines').closest('.scroll').scrollWidth") > 360
        # tables say what they hold: a caption, column headers, and each engine's name as its row's header
        assert page.evaluate("""[...document.querySelectorAll('table')].every((t) => t.caption && t.tHead)""")
        assert page.get_attribute('#engines tr[data-engine="beta"] th', "scope") == "row"
        # Tab walks to every action; Enter on a focused button acts
        reached = []
        for _ in range(40):
            page.keyboard.press("Tab")
            reached.append(page.evaluate("(() => { const e = document.activeElement; "
                                         "return (e.closest('tr')?.dataset.engine || '') + ':' + e.textContent; })()"))
        assert {"alpha.0:Restart", "alpha.0:Drain", "beta:Restart", "beta:Drain"} <= set(reached)
        assert browser.errors == []
    finally:
        browser.close()


HOSTILE = '<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


def test_what_clients_sent_is_shown_as_text_and_the_page_runs_only_its_own_script(
    fleet: InProcessFleet, tmp_path: Path
) -> None:
    page_headers = httpx.get(fleet.url + "/ui", timeout=10).headers
    assert "script-src 'self'" in page_headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page_headers["content-security-policy"]
    assert page_headers["x-content-type-options"] == "nosniff"
    browser = Browser(fleet.url, tmp_path / "profile")
    try:
        page = browser.page
        page.wait_for_selector('#engines tr[data-engine="beta"]')
        title = page.title()
        assert complete(fleet.url, "beta", prompt=HOSTILE).status_code == 200  # a prompt, shown ([ui] show_prompts)
        assert complete(fleet.url, HOSTILE).status_code == 404  # a model name, refused: its message quotes it
        browser.wait_for("() => [...document.querySelectorAll('#requests td.prompt')].some((td) => "
                         "td.textContent.includes('<img src=x'))")
        assert page.evaluate("document.querySelectorAll('#requests img, #requests script').length") == 0
        assert page.title() == title
        # an action the page refuses quotes what it was given as text too
        page.evaluate(f"say({json.dumps(HOSTILE)}, 'error')")
        assert page.evaluate("document.querySelectorAll('#message img, #message script').length") == 0
        assert page.title() == title
        assert browser.errors == []  # the page's own script and style run under its policy
        # a script the page did not bring from its own files is refused by the browser
        page.evaluate("""(() => { const s = document.createElement('script');
                                  s.textContent = "document.title = 'pwned'"; document.body.append(s); })()""")
        assert page.title() == title
        assert any("Content Security Policy" in e for e in browser.errors)
    finally:
        browser.close()


# --- pure parts ----------------------------------------------------------------------------------


def test_the_config_in_effect_masks_every_secret() -> None:
    config = FleetConfig.from_data({"auth": {"keys": ["sk-1", {"key": "sk-2", "models": ["m"]}]},
                                    "ui": {"admin_key": "adm"},
                                    "models": [{"name": "m", "source": "default", "port": 5001}]})
    text = effective_toml(config)
    assert "sk-1" not in text and "sk-2" not in text and "adm\"" not in text
    assert text.count(MASK) == 3 and 'name = "m"' in text


def test_the_journal_gives_what_came_after_a_number_in_order() -> None:
    journal = Journal(lines_kept=3)
    lifecycle = Lifecycle("a")
    lifecycle.listeners.append(journal.transition)
    journal.line("a", "one")
    journal.line("b", "two")
    lifecycle.to(EngineState.STARTING)
    journal.line("a", "three")
    journal.line("a", "four")
    journal.line("a", "five")
    assert [(x.seq, x.engine, x.text) for x in journal.lines_after(0)] == [
        (2, "b", "two"), (4, "a", "three"), (5, "a", "four"), (6, "a", "five")]  # "one" fell out of a's last 3
    assert [(c.seq, c.old, c.new) for c in journal.changes_after(0)] == [(3, "stopped", "starting")]
    assert [x.text for x in journal.lines_after(4)] == ["four", "five"]
    assert journal.changes_after(3) == []


def test_recent_keeps_the_last_requests_numbered() -> None:
    recent = Recent(kept=2)
    for model in ("a", "b", "c"):
        recent.add(Trace(model=model))
    assert [(t.seq, t.model) for t in recent.after(0)] == [(2, "b"), (3, "c")]
    assert [t.model for t in recent.after(2)] == ["c"] and recent.after(3) == []


def test_a_prompt_is_shown_by_its_start() -> None:
    assert prompt_preview("x" * 500) == "x" * 160
    assert prompt_preview(["first", "second"]) == "first"
    assert prompt_preview([1, 2, 3]) == "3 token ids"
    assert prompt_preview([[1, 2], [3]]) == "2 token ids"


def test_without_nvml_there_is_no_gpu_and_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    def no_driver() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_driver)
    gpus = Gpus()
    assert gpus.read() == [] and gpus.read() == []  # the second within a minute does not even try


def test_history_samples_rates_and_error_shares_per_replica() -> None:
    from fleet.config.model import ModelConfig
    from fleet.wire.client import EngineClient

    cfg = ModelConfig(name="m", source="default", port=5001)
    replica = Replica("m", Lifecycle("m"), EngineClient("m", "127.0.0.1", 5001))
    backend = ServedModel(cfg, [replica])
    history = History(lambda: {"m": backend})
    history.sample(now=100.0)
    for _ in range(10):
        replica.stats.begin()
        replica.stats.end()
    replica.stats.errors += 2
    point = history.sample(now=130.0).points["m"]
    assert point.requests_per_min == 20.0 and point.error_share == 0.2
    assert [p.at for p in history.points["m"]] == [100.0, 130.0]
    backend.replicas = []  # a reload removed it
    history.sample(now=132.0)
    assert "m" not in history.points
