"""/v1/chat/completions against real vLLM CPU engines: the SDK and LangChain's ChatOpenAI.

tiny-a's tokenizer carries a chat template; tiny-b's has none and gets one from fleet.toml.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from tiny_model import EOS

NO_EOS = {"ignore_eos": True}
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_chat_renders_the_template_on_the_engine(tiny: openai.OpenAI, model: str) -> None:
    """Greedy chat content equals a completion of the template-rendered prompt."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    r = tiny.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, extra_body=NO_EOS)
    rendered = f"<|system|>Be brief.{EOS}<|user|>Hello world{EOS}<|assistant|>"
    c = tiny.completions.create(model=model, prompt=rendered, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert r.choices[0].message.content == c.choices[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == model
    assert r.usage.prompt_tokens == c.usage.prompt_tokens and r.usage.completion_tokens == 8


def test_text_parts_equal_string_content(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", max_tokens=5, temperature=0, extra_body=NO_EOS)
    plain = tiny.chat.completions.create(messages=HELLO, **kw).choices[0].message.content
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    assert tiny.chat.completions.create(messages=parts, **kw).choices[0].message.content == plain


def test_chat_stream_opens_with_role_then_content_then_usage(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", messages=HELLO, max_tokens=6, temperature=0, extra_body=NO_EOS)
    whole = tiny.chat.completions.create(**kw).choices[0].message.content
    chunks = list(tiny.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6



def test_chat_continuous_usage_opens_with_zero_completion_tokens_then_counts_up(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-a", messages=HELLO, max_tokens=6, temperature=0, extra_body=NO_EOS)
    chunks = list(tiny.chat.completions.create(
        stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}, **kw))
    *deltas, final = chunks
    assert deltas[0].choices[0].delta.role == "assistant" and deltas[0].usage.completion_tokens == 0
    counts = [c.usage.completion_tokens for c in deltas]
    assert counts == sorted(counts) and counts[-1] == 6
    assert {c.usage.prompt_tokens for c in deltas} == {final.usage.prompt_tokens}
    assert final.usage.completion_tokens == 6

def test_chat_n_and_seed(tiny: openai.OpenAI) -> None:
    kw = dict(model="tiny-b", messages=HELLO, max_tokens=6, temperature=1.0, n=3, seed=9, extra_body=NO_EOS)
    a, b = tiny.chat.completions.create(**kw), tiny.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_chat_logprobs_in_chat_format(tiny: openai.OpenAI) -> None:
    r = tiny.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                     top_logprobs=3, extra_body=NO_EOS)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy: the best
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_chat_beam_search_follows_completions_rules(tiny: openai.OpenAI) -> None:
    r = tiny.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=3, temperature=0, n=2,
                                     extra_body={"use_beam_search": True, "best_of": 3, **NO_EOS})
    assert len(r.choices) == 2 and r.choices[0].message.content != r.choices[1].message.content
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="tiny-a", messages=HELLO, temperature=0.7,
                                     extra_body={"use_beam_search": True, "best_of": 3})
    assert e.value.body["param"] == "temperature"


def test_tools_on_a_model_without_a_parser_need_a_forced_choice_and_none_answers_in_words(tiny: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="tiny-b", messages=HELLO, tools=[tool])  # "auto", the default
    assert e.value.body["param"] == "tool_choice" and "tool_parser" in e.value.body["message"]
    r = tiny.chat.completions.create(model="tiny-b", messages=HELLO, tools=[tool], tool_choice="none", max_tokens=2)
    assert r.choices[0].message.content is not None and not r.choices[0].message.tool_calls


def test_default_model_chats(default: openai.OpenAI) -> None:
    r = default.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20, temperature=0,
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_json_schema_output_validates(default: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = default.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}},
    )
    data = json.loads(r.choices[0].message.content)
    jsonschema.validate(data, schema)


def test_json_object_output_parses(tiny: openai.OpenAI) -> None:
    r = tiny.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=120, temperature=0,
                                     response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # a random model may run out of tokens; what it wrote is still a JSON prefix
        assert r.choices[0].message.content.lstrip().startswith("{")


UNSATISFIABLE = {"type": "integer", "minimum": 5, "maximum": 1}
NOWHERE = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}


@pytest.mark.parametrize(("body", "param", "says"), [
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"grammar": "not a grammar ::= ="}}, "structured_outputs.grammar", "grammar"),
    ({"structured_outputs": {"json": NOWHERE}}, "structured_outputs.json", "'/$defs/missing' does not exist"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": UNSATISFIABLE}}},
     "response_format.json_schema.schema", "Unsatisfiable schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": NOWHERE}}], "tool_choice": "required"},
     "tools", "does not exist"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "g", "parameters": NOWHERE}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tools[1].function.parameters", "does not exist"),
])
def test_a_structure_vllm_cannot_hold_the_answer_to_is_a_400_naming_the_field_that_asked_for_it(
        tiny: openai.OpenAI, body: dict, param: str, says: str) -> None:
    extra = {k: v for k, v in body.items() if k == "structured_outputs"}
    kw = {k: v for k, v in body.items() if k != "structured_outputs"}
    with pytest.raises(openai.BadRequestError) as e:
        tiny.chat.completions.create(model="tiny-a", messages=HELLO, max_tokens=4, extra_body=extra, **kw)
    assert e.value.param == param and says in e.value.message


@pytest.mark.parametrize("model", ["tiny-a", "tiny-b"])
def test_langchain_chat_openai_invoke_stream_batch(fleets, model: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=model, base_url=fleets.ready("tiny").url + "/v1", api_key="x", max_tokens=5,
                     temperature=0, max_retries=0)
    msg = llm.invoke("Hello")
    assert msg.content
    streamed = "".join(chunk.content for chunk in llm.stream("Hello"))
    assert streamed == msg.content
    batch = llm.batch(["Hello", "Once upon"])
    assert batch[0].content == msg.content and len(batch) == 2


def test_langchain_chat_openai_on_the_default_model(fleets) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2", base_url=fleets.ready("default").url + "/v1", api_key="x", max_tokens=20,
                     temperature=0, max_retries=0)
    assert "Paris" in llm.invoke("What is the capital of France?").content
