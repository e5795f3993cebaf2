"""Embeddings, /tokenize and /detokenize on real engines through the real launcher; clients are the
openai SDK and LangChain.

The embedding model is a generative one converted by vLLM's pooling runner (`task = "embed"`):
the tiny generated model, in a fleet of this module's own that stops when the module ends (an
idle engine kept for the whole session slowed every later engine's start: page cache). The packaged
default model converts the same way (docs/benchmarks.md measures it); /tokenize runs on it, as
the shared default fleet serves it.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from fleets import TINY, FleetProcess, Fleets, free_port, running_fleet

EMBED = "tiny-embed"
HIDDEN = 128  # the tiny model's hidden size: its embeddings' length


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, tiny_model: Path) -> Iterator[FleetProcess]:
    model = {"name": EMBED, "source": str(tiny_model), "task": "embed", "port": free_port(), **TINY}
    with running_fleet([model], tmp_path_factory.mktemp("embed"), ready_timeout=600) as fleet:
        yield fleet  # the module's last test SIGKILLs the launcher: running_fleet still stops the engines


@pytest.fixture(scope="module")
def sdk(embedder: FleetProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=embedder.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_float_and_base64_decode_to_the_same_vectors_and_a_text_is_itself(sdk: openai.OpenAI) -> None:
    texts = ["The capital of France is Paris.", "Embeddings map text to vectors."]
    floats = sdk.embeddings.create(model=EMBED, input=texts)
    raw = sdk.embeddings.with_raw_response.create(model=EMBED, input=texts, encoding_format="base64")
    assert floats.usage.prompt_tokens > 10 and len(floats.data) == 2
    for d, b in zip(floats.data, raw.http_response.json()["data"], strict=True):
        decoded = list(struct.unpack(f"<{len(d.embedding)}f", base64.b64decode(b["embedding"])))
        assert decoded == d.embedding and len(decoded) == HIDDEN
    again = sdk.embeddings.create(model=EMBED, input=texts[0]).data[0].embedding
    assert cosine(again, floats.data[0].embedding) == pytest.approx(1.0, abs=1e-6)
    assert cosine(floats.data[0].embedding, floats.data[1].embedding) < 0.999


def test_a_batch_equals_its_parts_one_by_one(sdk: openai.OpenAI) -> None:
    texts = ["one", "two words", "and a third, longer input"]
    batch = [d.embedding for d in sdk.embeddings.create(model=EMBED, input=texts).data]
    alone = [sdk.embeddings.create(model=EMBED, input=t).data[0].embedding for t in texts]
    for b, a in zip(batch, alone, strict=True):
        assert cosine(a, b) == pytest.approx(1.0, abs=1e-5)


def test_langchain_openai_embeddings_against_the_gateway(embedder: FleetProcess) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model=EMBED, base_url=embedder.url + "/v1", api_key="x", check_embedding_ctx_length=False)
    docs = lc.embed_documents(["first document", "second document"])
    query = lc.embed_query("first document")
    assert len(docs) == 2 and len(query) == HIDDEN
    assert cosine(query, docs[0]) == pytest.approx(1.0, abs=1e-5) and cosine(query, docs[1]) < 0.9999


def test_dimensions_on_a_model_without_them_is_400_naming_dimensions(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.embeddings.create(model=EMBED, input="x", dimensions=64)
    assert refused.value.body["param"] == "dimensions"


def test_the_embedding_model_serves_no_completions_and_says_so(sdk: openai.OpenAI, embedder: FleetProcess) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.completions.create(model=EMBED, prompt="x", max_tokens=1)
    assert refused.value.body["param"] == "model" and "/v1/embeddings" in refused.value.body["message"]
    assert {m.id: m.model_extra["task"] for m in sdk.models.list()} == {EMBED: "embed"}
    # its tokenizer counts as its embeddings' usage does
    text = "five words in this input"
    count = httpx.post(f"{embedder.url}/tokenize", json={"model": EMBED, "prompt": text}, timeout=30).json()["count"]
    assert count == sdk.embeddings.create(model=EMBED, input=text).usage.prompt_tokens


def test_tokenize_then_detokenize_gives_the_text_back_and_counts_as_usage(fleets: Fleets, default: openai.OpenAI) -> None:
    url = fleets.ready("default").url
    text = "The capital of France is"
    tokens = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "prompt": text}, timeout=30).json()
    answer = default.completions.create(model="smollm2", prompt=text, max_tokens=1)
    assert tokens["count"] == len(tokens["tokens"]) == answer.usage.prompt_tokens and tokens["max_model_len"] == 2048
    back = httpx.post(f"{url}/detokenize", json={"model": "smollm2", "tokens": tokens["tokens"]}, timeout=30).json()
    assert back["prompt"] == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat_tokens = httpx.post(f"{url}/tokenize", json={"model": "smollm2", "messages": messages,
                                                      "return_token_strs": True}, timeout=30).json()
    chat = default.chat.completions.create(model="smollm2", messages=messages, max_tokens=1)
    assert chat_tokens["count"] == chat.usage.prompt_tokens and len(chat_tokens["token_strs"]) == chat_tokens["count"]


def test_a_sigkilled_launcher_takes_its_real_engines_with_it(embedder: FleetProcess) -> None:
    """Last of the module (its fleet ends here): the launcher SIGKILLed, nothing it started lives on
    (the engines set PR_SET_PDEATHSIG; vLLM's EngineCore and worker follow their engine)."""
    family = embedder.descendants()
    assert len(family) >= 3  # the engine, vLLM's EngineCore and its worker
    embedder.proc.kill()
    embedder.proc.wait(10)
    assert psutil.wait_procs(family, timeout=60)[1] == []
