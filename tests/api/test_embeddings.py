"""/v1/embeddings, /tokenize, /detokenize and /v1/models/{id} through the gateway, on fake engines
(the fake embeds each text as a fixed unit vector, tokenizes by words); the real pooling engine,
the openai SDK and LangChain are in tests/e2e/test_embeddings.py."""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterator

import httpx
import openai
import pytest
from fleets import FakeFleets, InProcessFleet

VECTORS = {"name": "vectors", "task": "embed", "engine_args": {"fake_dimensions": 8}, "limits": {"prompts": 4}}
NESTED = {"name": "nested", "task": "embed", "engine_args": {"fake_dimensions": 8, "fake_matryoshka": True}}
WORDS = {"name": "words"}


@pytest.fixture(scope="module")
def fleet(module_fake_fleet: FakeFleets) -> InProcessFleet:
    return module_fake_fleet(VECTORS, NESTED, WORDS, auth={"keys": ["sk-all", {"key": "sk-words", "models": ["words"]}]})


@pytest.fixture(scope="module")
def sdk(fleet: InProcessFleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=fleet.url + "/v1", api_key="sk-all", max_retries=0) as client:
        yield client


def post(fleet: InProcessFleet, path: str, key: str = "sk-all", **body: object) -> httpx.Response:
    return httpx.post(fleet.url + path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)


def test_float_and_base64_give_the_same_vectors_in_input_order(sdk: openai.OpenAI) -> None:
    texts = ["the first", "a second one", "third"]
    floats = sdk.embeddings.create(model="vectors", input=texts, encoding_format="float")
    raw = sdk.embeddings.with_raw_response.create(model="vectors", input=texts, encoding_format="base64").http_response.json()
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == "vectors" and floats.object == "list"
    for d, b in zip(floats.data, raw["data"], strict=True):
        decoded = struct.unpack(f"<{len(d.embedding)}f", base64.b64decode(b["embedding"]))
        assert list(decoded) == pytest.approx(d.embedding, abs=0) and len(decoded) == 8
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 2 + 3 + 1


def test_a_batch_is_its_parts_and_the_same_text_the_same_vector(sdk: openai.OpenAI) -> None:
    batch = sdk.embeddings.create(model="vectors", input=["alpha", "beta"]).data
    alone = [sdk.embeddings.create(model="vectors", input=t).data[0].embedding for t in ("alpha", "beta")]
    assert [d.embedding for d in batch] == alone and alone[0] != alone[1]


def test_token_id_inputs_are_embedded(sdk: openai.OpenAI) -> None:
    one = sdk.embeddings.create(model="vectors", input=[5, 6, 7])
    many = sdk.embeddings.create(model="vectors", input=[[5, 6, 7], [8]])
    assert one.data[0].embedding == many.data[0].embedding and many.usage.prompt_tokens == 4


def test_dimensions_only_where_the_model_has_them(sdk: openai.OpenAI) -> None:
    assert len(sdk.embeddings.create(model="nested", input="x", dimensions=4).data[0].embedding) == 4
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model="vectors", input="x", dimensions=4)
    assert refused.value.body["param"] == "dimensions"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": []}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": ["a", 1]}, "input"),
    ({"input": [[False]]}, "input[0][0]"),  # JSON's true and false are no token ids (found by the fuzz's random seed)
    ({"input": [True, 2]}, "input[0]"),
    ({"input": [[1.5]]}, "input[0][0]"),
    ({"input": [["a"]]}, "input[0][0]"),
    ({"input": [{"text": "a"}]}, "input[0]"),
    ({"input": ["a", "b", "c", "d", "e"]}, "input"),  # over the model's limits.prompts (4)
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
])
def test_bad_embedding_requests_are_400_naming_the_field(fleet: InProcessFleet, body: dict, param: str) -> None:
    r = post(fleet, "/v1/embeddings", model="vectors", **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_each_kind_of_model_refuses_the_other_kind_of_request_naming_model(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as generation:
        sdk.embeddings.create(model="words", input="x")
    assert generation.value.body["param"] == "model" and "/v1/completions" in generation.value.body["message"]
    with pytest.raises(openai.BadRequestError) as embedding:
        sdk.completions.create(model="vectors", prompt="x")
    assert embedding.value.body["param"] == "model" and "/v1/embeddings" in embedding.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="vectors", messages=[{"role": "user", "content": "x"}])


def test_models_say_what_each_serves(sdk: openai.OpenAI, fleet: InProcessFleet) -> None:
    tasks = {m.id: m.model_extra["task"] for m in sdk.models.list()}
    assert tasks == {"vectors": "embed", "nested": "embed", "words": "generate"}
    assert sdk.models.retrieve("nested").model_extra["task"] == "embed"


def test_embeddings_need_a_key_that_may_use_the_model(fleet: InProcessFleet) -> None:
    assert post(fleet, "/v1/embeddings", key="nope", model="vectors", input="x").status_code == 401
    limited = post(fleet, "/v1/embeddings", key="sk-words", model="vectors", input="x")
    assert limited.status_code == 403 and limited.json()["error"]["code"] == "model_not_allowed"


def test_embeddings_are_counted_in_metrics(fleet: InProcessFleet) -> None:
    assert post(fleet, "/v1/embeddings", model="vectors", input="counted").status_code == 200
    text = httpx.get(fleet.url + "/metrics", headers={"Authorization": "Bearer sk-all"}, timeout=10).text
    assert 'route="embeddings"' in text and 'model="vectors"' in text


def test_tokenize_then_detokenize(fleet: InProcessFleet) -> None:
    r = post(fleet, "/tokenize", model="words", prompt="one two three", return_token_strs=True)
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == 3 == len(body["tokens"]) and body["token_strs"] == ["one", "two", "three"]
    assert body["max_model_len"] == 64
    back = post(fleet, "/detokenize", model="words", tokens=body["tokens"])
    assert back.status_code == 200 and back.json()["prompt"] == "".join(f" t{i}" for i in body["tokens"])
    chat = post(fleet, "/tokenize", model="words", messages=[{"role": "user", "content": "hi there"}]).json()
    assert chat["count"] == 4 and chat["token_strs"] is None  # "user: hi there" and "assistant:", as the fake renders


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/tokenize", {"model": "words"}, "prompt"),
    ("/tokenize", {"model": "words", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
    ("/tokenize", {"model": "words", "messages": []}, "messages"),
    ("/detokenize", {"model": "words", "tokens": [-1]}, "tokens"),
    ("/detokenize", {"model": "words", "tokens": "abc"}, "tokens"),
])
def test_bad_token_requests_are_400_naming_the_field(fleet: InProcessFleet, path: str, body: dict, param: str) -> None:
    r = post(fleet, path, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_tokenize_answers_for_known_models_with_a_key_only(fleet: InProcessFleet) -> None:
    assert post(fleet, "/tokenize", model="nope", prompt="x").status_code == 404
    assert post(fleet, "/tokenize", key="bad", model="words", prompt="x").status_code == 401
    assert post(fleet, "/detokenize", key="sk-words", model="vectors", tokens=[1]).status_code == 403
