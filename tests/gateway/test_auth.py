"""Auth (fleet.gateway.auth: keys from every source, keys limited to models), per-model caps, the
body limit, the engine token and metrics: the gateway with fake engines; and the admission gate
on its own.

Admission's 429s and queue timeout and the engine timeout's 504 are tested end to end, under
load, in tests/gateway/test_load.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fleets import FakeFleets, InProcessFleet
from litestar.testing import TestClient

from fleet.config.schema import AuthConfig
from fleet.errors import Forbidden, Unauthorized
from fleet.gateway.admission import Admission
from fleet.gateway.auth import Key, Keys, load_keys

KEYS = {"keys": ["sk-admin", {"key": "sk-alpha", "models": ["alpha"]}], "keys_env": "TEST_FLEET_KEYS"}


def fake(name: str, **kw: Any) -> dict[str, Any]:
    engine_args = {"fake_word": name, **kw.pop("engine_args", {})}
    return {"name": name, "engine_args": engine_args, **kw}


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessFleet]:
    (keys_file := tmp_path_factory.mktemp("keys") / "keys").write_text("# keys\nsk-file beta\n")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TEST_FLEET_KEYS", "sk-env")
        yield module_fake_fleet(
            fake("alpha", limits={"n": 2, "max_tokens": 8, "prompts": 2}),
            fake("beta"),
            gateway={"max_body_bytes": 4096},
            auth={**KEYS, "keys_file": str(keys_file)},
        )


def post(f: InProcessFleet, key: str | None, **body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{f.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, **body}, headers=headers,
                      timeout=20)


# --- auth ----------------------------------------------------------------------------------


def test_missing_and_wrong_keys_are_401_on_every_v1_route(fleet: InProcessFleet) -> None:
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                         ("GET", "/v1/models/alpha"), ("GET", "/metrics"), ("GET", "/fleet/status")]:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic sk-admin"}):
            r = httpx.request(method, fleet.url + path, json={"model": "alpha"}, headers=headers)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"


def test_health_stays_open(fleet: InProcessFleet) -> None:
    assert httpx.get(fleet.url + "/health").status_code == 200


def test_keys_from_the_file_the_environment_and_fleet_toml_all_work(fleet: InProcessFleet) -> None:
    assert post(fleet, "sk-admin", model="beta").status_code == 200
    assert post(fleet, "sk-env", model="beta").status_code == 200
    assert post(fleet, "sk-file", model="beta").status_code == 200


def test_a_key_limited_to_some_models_gets_403_for_others_and_sees_only_its_models(fleet: InProcessFleet) -> None:
    assert post(fleet, "sk-alpha", model="alpha").status_code == 200
    r = post(fleet, "sk-alpha", model="beta")
    assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
    assert post(fleet, "sk-file", model="alpha").status_code == 403
    sdk = openai.OpenAI(base_url=fleet.url + "/v1", api_key="sk-alpha", max_retries=0)
    assert [m.id for m in sdk.models.list().data] == ["alpha"]
    assert sdk.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.PermissionDeniedError):
        sdk.models.retrieve("beta")
    with pytest.raises(openai.PermissionDeniedError):
        sdk.completions.create(model="beta", prompt="x")
    assert httpx.get(fleet.url + "/fleet/status", headers={"Authorization": "Bearer sk-alpha"}).status_code == 403


def test_keys_compare_every_key_and_never_print_secrets() -> None:
    keys = Keys([Key(b"sk-one", None), Key(b"sk-two", frozenset({"m"}))])
    assert keys.check("Bearer sk-two").models == frozenset({"m"})
    with pytest.raises(Unauthorized):
        keys.check("Bearer sk-on")
    with pytest.raises(Forbidden):
        Keys.allow(keys.check("Bearer sk-two"), "other")
    assert "sk-" not in repr(keys.keys) and "sk-" not in repr(load_keys(AuthConfig(keys=["sk-three"])).keys)


def test_engine_refuses_requests_without_the_fleet_token(fleet: InProcessFleet) -> None:
    from fleet.engine.server import create_engine_app
    from fleet.wire import protocol

    class Service:
        healthy = True
        info = protocol.EngineInfo("m", 16, 10, 0, "x", "cpu")

        async def frames(self, req: protocol.GenerateRequest):
            yield protocol.encode_frame(protocol.Done(prompt_tokens=1, completion_tokens=0))

        embed = tokenize = detokenize = frames

    with TestClient(create_engine_app(Service(), token="secret")) as client:  # type: ignore[arg-type]
        body = protocol.encode(protocol.GenerateRequest(request_id="r", prompt="x"))
        assert client.post("/generate", content=body).status_code == 401
        for path, message in [("/embed", protocol.EmbedRequest(request_id="r", inputs=["x"])),
                              ("/tokenize", protocol.TokenizeRequest("x")), ("/detokenize", protocol.DetokenizeRequest([1]))]:
            assert client.post(path, content=protocol.encode(message)).status_code == 401
            assert client.post(path, content=protocol.encode(message), headers={"Authorization": "Bearer secret"}).status_code == 200
        assert client.get("/info").status_code == 401
        assert client.get("/health").status_code == 200
        assert client.post("/generate", content=body, headers={"Authorization": "Bearer secret"}).status_code == 200


# --- limits and admission ----------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 3}, "n"), ({"max_tokens": 9}, "max_tokens"), ({"prompt": ["a", "b", "c"]}, "prompt"),
    ({"best_of": 25, "n": 1}, "best_of"),
])
def test_per_model_caps_are_400_naming_the_field(fleet: InProcessFleet, body: dict, param: str) -> None:
    r = post(fleet, "sk-admin", model="alpha", **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_body_over_max_body_bytes_is_413(fleet: InProcessFleet) -> None:
    r = post(fleet, "sk-admin", model="alpha", prompt="x" * 10_000)
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_queued_request_cancelled_as_it_is_handed_a_slot_stays_cancelled_and_frees_the_slot() -> None:
    async def main() -> None:
        gate = Admission("m", max_concurrent=1, max_queued=1, queue_timeout=30)
        ran = False

        async def queued() -> None:
            nonlocal ran
            async with gate.slot():
                ran = True

        first = gate.slot()
        await first.__aenter__()
        task = asyncio.create_task(queued())
        while gate.queued == 0:
            await asyncio.sleep(0)
        await first.__aexit__(None, None, None)  # hands its slot to the queued request...
        task.cancel()  # ...which is cancelled in the same turn (a client that left)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not ran and gate.running == 0 and gate.queued == 0

    asyncio.run(main())


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_engine_state(fleet: InProcessFleet) -> None:
    post(fleet, "sk-admin", model="beta", max_tokens=3, stream=True)
    post(fleet, "sk-admin", model="nope")
    text = httpx.get(fleet.url + "/metrics", headers={"Authorization": "Bearer sk-admin"}).text
    assert 'fleet_requests_total{model="beta",route="completions",status="200"}' in text
    assert 'fleet_engine_state{model="beta",state="ready"} 1.0' in text
    assert 'fleet_completion_tokens_total{model="beta"}' in text
    assert 'fleet_requests_in_flight{model="beta"} 0.0' in text
    assert 'fleet_time_to_first_token_seconds_count{model="beta",route="completions"}' in text
    assert 'fleet_request_duration_seconds_bucket{le="0.005",model="beta",route="completions"}' in text
    assert "fleet_engine_restarts_total" in text and "fleet_requests_queued" in text


def test_keys_file_that_cannot_be_read_names_it(tmp_path: Path) -> None:
    from fleet.errors import ConfigError

    with pytest.raises(ConfigError, match="keys_file"):
        load_keys(AuthConfig(keys_file=str(tmp_path / "missing")))
