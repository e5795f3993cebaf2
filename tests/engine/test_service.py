"""The engine service's frames (fleet.engine.service), on vLLM-shaped outputs: fast extra tests
beside the end-to-end ones, which run the real engine."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec

from fleet.engine.parsing import Parsers
from fleet.engine.refusals import ENDED_IN_ERROR
from fleet.engine.service import EngineService
from fleet.wire import protocol


class Tokenizer:
    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


def service() -> EngineService:
    s = EngineService.__new__(EngineService)  # no vLLM engine: only the frame building is under test
    s.tokenizer = Tokenizer()
    s.parsers = Parsers(s.tokenizer, None, None)  # nothing read apart
    return s


def output(**kw: Any) -> SimpleNamespace:
    logprob = SimpleNamespace(logprob=-0.5, decoded_token=" a")
    fields = dict(index=1, text=" a", token_ids=[7], logprobs=[{7: logprob}], finish_reason=None,
                  cumulative_logprob=-0.5)
    return SimpleNamespace(**{**fields, **kw})


def test_best_of_alone_gets_the_cumulative_logprob_without_per_token_logprobs() -> None:
    delta = service().delta(output(), per_token=False)
    assert delta == protocol.Delta(index=1, text=" a", token_ids=[7], logprobs=None, cumulative_logprob=-0.5)


def test_a_client_that_asks_for_logprobs_gets_them_per_token() -> None:
    delta = service().delta(output(), per_token=True)
    assert delta.logprobs == [protocol.TokenLogprob(" a", -0.5, [(" a", -0.5)])]
    assert delta.cumulative_logprob == -0.5


def test_the_finishing_step_leaves_with_done_as_the_answers_last_chunk_after_vllm_ended_the_request() -> None:
    """The finishing step's frames and Done go out together, marked last (the response ends with
    them); vLLM's generate is run to its end, not closed early (closing it aborts the request)."""
    import asyncio

    from fleet.wire.asgi import LastChunk

    ends: list[str] = []

    class Engine:
        async def generate(self, prompt: Any, params: Any, request_id: str, lora_request: Any = None) -> Any:
            try:
                for k, finished in ((1, False), (2, True)):
                    yield SimpleNamespace(outputs=[output(index=0, text=f"t{k}", token_ids=[k], logprobs=None,
                                                          finish_reason="length" if finished else None)],
                                          finished=finished, num_cached_tokens=0, prompt_logprobs=None)
                ends.append("ran to its end")
            except GeneratorExit:
                ends.append("closed early")
                raise

    s = service()
    s.engine, s.vocab_size, s.max_model_len = Engine(), 100, 64

    async def answer() -> list[bytes]:
        req = protocol.GenerateRequest(request_id="r", prompt=[1, 2], sampling=protocol.SamplingParams(max_tokens=2))
        return [chunk async for chunk in s.frames(req)]

    chunks = asyncio.run(answer())
    frames = [protocol.FrameSplitter().feed(c) for c in chunks]
    assert [type(c) is LastChunk for c in chunks] == [False, True]
    assert [type(f).__name__ for f in frames[0]] == ["Prompt", "Delta"]
    last_delta, done = frames[1]
    assert last_delta.text == "t2" and last_delta.finish_reason == "length"
    assert done == protocol.Done(prompt_tokens=2, completion_tokens=2, cached_tokens=0)
    assert ends == ["ran to its end"]


def test_engine_closes_a_requests_frames_when_the_gateway_drops_its_connection() -> None:
    """The gateway closing a /generate connection mid-stream closes the frames (aborting in vLLM)."""
    import asyncio
    import socket

    import uvicorn

    from fleet.engine.server import create_engine_app
    from fleet.wire import protocol

    async def main() -> tuple[bytes, bool]:
        closed = asyncio.Event()

        class Service:
            healthy = True
            info = protocol.EngineInfo("m", 16, 10, 0, "x", "cpu")

            async def frames(self, req: protocol.GenerateRequest):
                try:
                    for k in range(10_000):
                        yield protocol.encode_frame(protocol.Delta(index=0, text=f"t{k}", token_ids=[k]))
                        await asyncio.sleep(0.01)
                finally:
                    closed.set()

            embed = tokenize = detokenize = frames

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_engine_app(Service(), token="t"), log_level="warning"))  # type: ignore[arg-type]
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            body = protocol.encode(protocol.GenerateRequest(request_id="r", prompt="x"))
            writer.write(b"POST /generate HTTP/1.1\r\nhost: x\r\nauthorization: Bearer t\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.read(64)  # the first frames
            writer.close()
            await asyncio.wait_for(closed.wait(), 5)
            return head, closed.is_set()
        finally:
            server.should_exit = True
            await serving

    head, closed = asyncio.run(main())
    assert head.startswith(b"HTTP/1.1 200") and protocol.CONTENT_TYPE.encode() in head
    assert closed


def test_once_stopping_the_engine_drops_vllms_report_that_its_engine_core_died_and_nothing_else() -> None:
    """The launcher's SIGTERM reaches the whole process group, so vLLM's EngineCore quits beside the
    engine and vLLM logs "output_handler failed" with an EngineDeadError traceback: expected then,
    dropped; before the stop, and any other error, still logged."""
    import logging
    import sys

    from fleet.engine.server import ExpectedEngineDeath

    class EngineDeadError(Exception):  # vLLM's, by name (vllm.v1.engine.exceptions)
        pass

    def record(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:
            return logging.LogRecord("vllm.v1.engine.async_llm", logging.ERROR, __file__, 1,
                                     "AsyncLLM output_handler failed.", None, sys.exc_info())

    quiet = ExpectedEngineDeath()
    assert quiet.filter(record(EngineDeadError()))  # a real death while serving is reported
    quiet.stopping = True
    assert not quiet.filter(record(EngineDeadError()))
    assert quiet.filter(record(RuntimeError("something else")))
    assert quiet.filter(logging.LogRecord("vllm", logging.INFO, __file__, 1, "shutdown", None, None))


def test_vllms_validation_error_is_a_short_400_naming_its_parameter_without_the_rejected_values() -> None:
    from vllm.exceptions import VLLMValidationError

    from fleet.engine.refusals import refused

    error = VLLMValidationError("token_id(s) in logit_bias contain out-of-vocab token ids", parameter="logit_bias",
                                value=list(range(100_000)))
    frame = refused(error)
    assert frame == protocol.Error("token_id(s) in logit_bias contain out-of-vocab token ids", status=400,
                                   param="logit_bias")
    assert refused(ValueError("bad")) == protocol.Error("bad", status=400)
    assert refused(RuntimeError("engine died")) is None


def test_a_request_vllm_ends_with_finish_reason_error_is_a_500_not_a_delta() -> None:
    """vLLM's scheduler ends a request with finish reason "error" on a failure of its own (a
    grammar that refused the sampled token, seen with vLLM 0.24 on a GPU): the stream ends with an
    Error frame after what came before it, never a Delta whose finish reason the wire lacks."""
    import asyncio

    class Engine:
        async def generate(self, prompt: Any, params: Any, request_id: str, lora_request: Any = None) -> Any:
            yield SimpleNamespace(outputs=[output(index=0, text="{", token_ids=[1], logprobs=None)], finished=False,
                                  num_cached_tokens=0, prompt_logprobs=None)
            yield SimpleNamespace(outputs=[output(index=0, text="user", token_ids=[2], logprobs=None,
                                                  finish_reason="error")],
                                  finished=True, num_cached_tokens=0, prompt_logprobs=None)

    s = service()
    s.engine, s.vocab_size, s.max_model_len = Engine(), 100, 64

    async def answer() -> list[protocol.Frame]:
        req = protocol.GenerateRequest(request_id="r", prompt=[1, 2], sampling=protocol.SamplingParams(max_tokens=2))
        splitter = protocol.FrameSplitter()
        return [f async for chunk in s.frames(req) for f in splitter.feed(chunk)]

    frames = asyncio.run(answer())
    assert [type(f).__name__ for f in frames] == ["Prompt", "Delta", "Error"]
    assert frames[1].text == "{" and frames[2] == protocol.Error(ENDED_IN_ERROR, status=500)


def test_an_engine_failure_is_a_bounded_500() -> None:
    frame = EngineService.failure(RuntimeError("x" * 100_000), "r")
    assert frame.status == 500 and len(frame.message) < 1200


def test_token_ids_outside_the_vocabulary_are_named_a_few_then_counted() -> None:
    import pytest

    from fleet.errors import InvalidRequest

    s = service()
    s.vocab_size = 512
    with pytest.raises(InvalidRequest) as e:
        s.check_sampling_ids(protocol.SamplingParams(stop_token_ids=[5, *range(1000, 1010)]))
    assert e.value.param == "stop_token_ids"
    assert e.value.message == "10 token ids (1000, 1001, 1002, 1003, 1004 and 5 more) are out of the vocabulary (size 512)"
    s.check_sampling_ids(protocol.SamplingParams(logit_bias={511: 1.0}, allowed_token_ids=[0, 511]))


def conversation(turns: int, words: int = 10, question: int = 1) -> protocol.Chat:
    """A system message (2 tokens), then `turns` exchanges of 24 tokens each: a user's words, an
    assistant's call of a tool and the tool's answer, the assistant's reply; last a user's
    question (`question` tokens)."""
    said = " ".join(["w"] * words)
    messages = [protocol.ChatMessage("system", "be brief")]
    for t in range(turns):
        messages += [protocol.ChatMessage("user", f"u{t} {said}"),
                     protocol.ChatMessage("assistant", "", tool_calls=[protocol.ToolCall(f"c{t}", "f", "{}")]),
                     protocol.ChatMessage("tool", f"t{t}", tool_call_id=f"c{t}"),
                     protocol.ChatMessage("assistant", f"a{t} {said}")]
    return protocol.Chat(messages=[*messages, protocol.ChatMessage("user", " ".join(["q"] * question))])


def truncating(max_model_len: int) -> tuple[EngineService, list[tuple[list[str], int]]]:
    """A service whose template joins the messages' words and whose tokens are those words,
    recording each render: the first word of each message, and its tokens."""
    s = service()
    s.max_model_len = max_model_len
    rendered: list[tuple[list[str], int]] = []

    def render(chat: protocol.Chat) -> str:
        text = " ".join(m.content or m.role for m in chat.messages)
        rendered.append(([(m.content or m.role).split(" ")[0] for m in chat.messages], len(text.split(" "))))
        return text

    s.render_chat = render  # type: ignore[method-assign]
    s.encode = lambda text, special: list(range(len(text.split(" "))))  # type: ignore[method-assign]
    return s, rendered


def test_truncation_auto_leaves_out_the_fewest_oldest_turns_that_fit_keeping_the_system_message() -> None:
    chat = msgspec.structs.replace(conversation(8), truncate=True)  # 2 + 8 * 24 + 1 = 195 tokens
    s, rendered = truncating(max_model_len=120)
    ids = s.chat_ids(chat, need=16)  # at most 104 tokens: the last 4 turns (2 + 4 * 24 + 1 = 99)
    assert len(ids) == 99
    [kept] = [firsts for firsts, tokens in rendered if tokens == 99]
    assert kept[:2] == ["be", "u4"] and kept[-1] == "q"  # the system message stays, a user's turn opens it
    assert kept.count("assistant") == 4 and kept.count("t4") == 1  # each call with the tool's answer to it
    # searched from the latest turns: 1, 2, 4, 8 kept, then 6 and 5; never the whole conversation again
    assert [tokens for _, tokens in rendered] == [195, 3, 27, 75, 171, 123, 99]


def test_the_search_renders_the_long_conversation_once_and_then_only_about_the_contexts_size() -> None:
    chat = msgspec.structs.replace(conversation(1000), truncate=True)  # 24,003 tokens
    s, rendered = truncating(max_model_len=500)
    assert len(s.chat_ids(chat, need=16)) == 2 + 20 * 24 + 1  # 20 exchanges fit in 484
    assert rendered[0][1] == 24_003 and all(tokens <= 2 * 500 for _, tokens in rendered[1:])
    assert len(rendered) <= 1 + 2 * 5 + 1  # gallop to 32 turns kept, then a binary search below it


def test_without_truncation_or_when_it_fits_the_conversation_is_rendered_once_and_whole() -> None:
    s, rendered = truncating(max_model_len=120)
    assert len(s.chat_ids(conversation(8), need=16)) == 195 and len(rendered) == 1  # the 400 then says so
    s, rendered = truncating(max_model_len=1000)
    assert len(s.chat_ids(msgspec.structs.replace(conversation(8), truncate=True), need=16)) == 195
    assert len(rendered) == 1


def test_when_no_cut_fits_the_last_question_alone_is_what_the_context_check_sees() -> None:
    s, rendered = truncating(max_model_len=10)
    ids = s.chat_ids(msgspec.structs.replace(conversation(3, question=20), truncate=True), need=1)
    assert rendered[-1] == (["be", "q"], 22) and len(ids) == 22
