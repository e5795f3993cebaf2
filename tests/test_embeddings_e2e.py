"""Embeddings, /tokenize and /detokenize on real engines: the packaged default model served by
vLLM's pooling runner (`task = "embed"`, converted from the generative model) beside the same
model generating, through the real launcher; clients are the openai SDK and LangChain."""

from __future__ import annotations

import base64
import math
import struct

import httpx
import openai
import pytest
from conftest import Fleets

pytestmark = pytest.mark.e2e
EMBED = "smollm2-embed"


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_float_and_base64_decode_to_the_same_vectors_and_a_text_is_itself(default: openai.OpenAI) -> None:
    texts = ["The capital of France is Paris.", "Embeddings map text to vectors."]
    floats = default.embeddings.create(model=EMBED, input=texts)
    raw = default.embeddings.with_raw_response.create(model=EMBED, input=texts, encoding_format="base64")
    assert floats.usage.prompt_tokens > 10 and len(floats.data) == 2
    for d, b in zip(floats.data, raw.http_response.json()["data"], strict=True):
        decoded = list(struct.unpack(f"<{len(d.embedding)}f", base64.b64decode(b["embedding"])))
        assert decoded == d.embedding and len(decoded) == 576  # SmolLM2-135M's hidden size
    again = default.embeddings.create(model=EMBED, input=texts[0]).data[0].embedding
    assert cosine(again, floats.data[0].embedding) == pytest.approx(1.0, abs=1e-6)
    assert cosine(floats.data[0].embedding, floats.data[1].embedding) < 0.999


def test_a_batch_equals_its_parts_one_by_one(default: openai.OpenAI) -> None:
    texts = ["one", "two words", "and a third, longer input"]
    batch = [d.embedding for d in default.embeddings.create(model=EMBED, input=texts).data]
    alone = [default.embeddings.create(model=EMBED, input=t).data[0].embedding for t in texts]
    for b, a in zip(batch, alone, strict=True):
        assert cosine(a, b) == pytest.approx(1.0, abs=1e-5)


def test_langchain_openai_embeddings_against_the_gateway(fleets: Fleets) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model=EMBED, base_url=fleets.ready("default").url + "/v1", api_key="x",
                          check_embedding_ctx_length=False)
    docs = lc.embed_documents(["first document", "second document"])
    query = lc.embed_query("first document")
    assert len(docs) == 2 and len(query) == 576
    assert cosine(query, docs[0]) == pytest.approx(1.0, abs=1e-5) and cosine(query, docs[1]) < 0.9999


def test_dimensions_on_a_model_without_them_is_400_naming_dimensions(default: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        default.embeddings.create(model=EMBED, input="x", dimensions=64)
    assert refused.value.body["param"] == "dimensions"


def test_the_embedding_model_serves_no_completions_and_says_so(default: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        default.completions.create(model=EMBED, prompt="x", max_tokens=1)
    assert refused.value.body["param"] == "model" and "/v1/embeddings" in refused.value.body["message"]
    assert {m.id: m.model_extra["task"] for m in default.models.list()} == {"smollm2": "generate", EMBED: "embed"}


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
    embedded = httpx.post(f"{url}/tokenize", json={"model": EMBED, "prompt": text}, timeout=30).json()
    assert embedded["tokens"] == tokens["tokens"]  # the embedding model has the same tokenizer
