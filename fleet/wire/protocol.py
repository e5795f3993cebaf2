"""The internal protocol between the gateway and an engine: the only module both sides share.

HTTP/1.1 on the engine's port, msgpack bodies, the launcher's token as a bearer token
(`config.schema.ENGINE_TOKEN_ENV` hands it to the engine):

- ``GET /health``: 200 when ready, 503 while loading or after a fatal engine error.
- ``GET /info``: `EngineInfo`.
- ``POST /generate``: a `GenerateRequest`; the response body is a stream of frames, each a
  4-byte big-endian length followed by one msgpack-encoded `Frame`. Per output index the
  engine sends `Delta` frames, then one `Done` (or an `Error`). Closing the connection
  aborts the request on the engine.
- ``POST /embed`` (`EmbedRequest`: an `Embedding` per input, then `Done`), ``POST /tokenize``
  (`TokenizeRequest`: `Tokens`, then `Done`), ``POST /detokenize`` (`DetokenizeRequest`: `Text`,
  then `Done`): the same frames, so one client and one connection pool serve every route.

An engine on the gateway's machine serves the same four routes, the same requests and the same
frames, as streams of one connection on its Unix socket too (fleet.wire.mux).
"""

from __future__ import annotations

import struct
from typing import Literal, TypeVar

import msgspec

CONTENT_TYPE = "application/vnd.fleet.frames"
REQUEST_TYPE = "application/msgpack"
FRAME_HEADER = struct.Struct(">I")

# Keep-alive contract: the engine's server closes a connection idle for ENGINE_KEEP_ALIVE seconds;
# the gateway's client never reuses one idle for CLIENT_IDLE_LIMIT or longer, so it never sends a
# request on a connection the engine is closing at that moment.
ENGINE_KEEP_ALIVE = 5
CLIENT_IDLE_LIMIT = 4.0
assert CLIENT_IDLE_LIMIT < ENGINE_KEEP_ALIVE

FinishReason = Literal["stop", "length", "abort"]
ENGINE_DIED = 503  # an Error frame's status when vLLM's engine core died under the request


class _Message(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Base of every protocol message: strict, so a version mismatch fails loudly."""


class Structured(_Message):
    """Structured outputs: the answer held to exactly one of a JSON Schema (JSON text), any JSON
    object, a regular expression, one of some strings, or a grammar (vLLM's kinds)."""

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    param: str | None = None  # the client's field that asked for it: the engine's refusal of it names that field


class SamplingParams(_Message):
    """What the engine samples with; fleet's rules are already applied by the gateway."""

    n: int = 1
    max_tokens: int = 16
    clamp_max_tokens: bool = False  # a default, not the client's: shrink it to the room left
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] = []  # never generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # per-token logprobs with this many alternatives
    cumulative_logprob: bool = False  # report each choice's cumulative logprob (best_of ranks by it)
    prompt_logprobs: int | None = None
    structured: Structured | None = None  # structured outputs


class BeamSearch(_Message):
    """Classic beam search (vLLM 0.2.7 semantics), run step-wise on the engine."""

    width: int
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False


class ToolCall(_Message, array_like=True):
    """A call an assistant message made: its id, the function's name, its arguments (JSON text)."""

    id: str
    name: str
    arguments: str


class ChatMessage(_Message, array_like=True):
    """One message of a conversation, its content reduced to text; an assistant's tool calls, a
    tool's answer to one (`tool_call_id`)."""

    role: str
    content: str
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class Tool(_Message):
    """A function the model may call, as the chat template renders it: its name, what it does, its
    parameters (a JSON Schema, as JSON text)."""

    name: str
    description: str | None = None
    parameters: str | None = None


class Chat(_Message):
    """A conversation the engine renders with the model's chat template (with `tools`, when given)."""

    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    # the Responses API's truncation "auto": where the conversation does not fit the context, its
    # oldest turns are left out (fleet.engine.chat.turn_starts) until it does
    truncate: bool = False


class ToolUse(_Message):
    """How the engine reads tool calls out of a chat's answer. `auto`: the model's tool parser
    finds them, if it made any, in its own format; `named`: the whole answer is the arguments of
    the function `name` (constrained by its schema); `required`: the answer is a JSON array of
    {"name", "parameters"} objects (constrained likewise), one call each."""

    mode: Literal["auto", "named", "required"]
    name: str | None = None


class Resume(_Message):
    """A request taken over from a replica that died mid-answer: the prompt's last `generated`
    token ids are output the client already has, of whose text it has `text_sent` characters (the
    rest was held back, as vLLM holds back what might begin a stop string). The engine sends that
    rest first and matches `stop` across it and what it generates now."""

    generated: int
    text_sent: int


class GenerateRequest(_Message):
    """One prompt, as text, token ids or a conversation, and how to continue it."""

    request_id: str
    prompt: str | list[int] | Chat
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    beam: BeamSearch | None = None
    echo: bool = False  # send the prompt's text back in the Prompt frame
    # Nobody streams this answer: send each choice once, whole, when it ends (one Delta per choice
    # instead of one per token; the engine skips per-step output work too).
    final_only: bool = False
    tools: ToolUse | None = None  # read tool calls out of the answer (a Chat prompt only)
    reasoning: bool = False  # split the answer's reasoning from its content (the model's reasoning parser)
    adapter: str | None = None  # a LoRA adapter of the engine's model, by name (its [[models]] adapters)
    resume: Resume | None = None  # a continuation of another replica's answer (gateway/routing/resume.py)


class TokenLogprob(_Message, array_like=True):
    """One position: its token text, logprob, and the top alternatives (text, logprob)."""

    token: str
    logprob: float | None
    top: list[tuple[str, float]] | None = None


class Prompt(_Message, tag="prompt"):
    """Sent first: the prompt as the engine tokenized it (with logprobs when asked)."""

    token_ids: list[int]
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None


class ToolCallDelta(_Message, array_like=True):
    """A piece of one tool call of a choice: its first piece carries the call's id and the
    function's name, the others more of its arguments (JSON text, in order)."""

    index: int  # the call's place among the choice's calls
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(_Message, tag="delta"):
    """New output for one choice; the last one for that index carries finish_reason. With tools
    or reasoning asked, `text` is the content alone: the reasoning and the tool calls come apart."""

    index: int
    text: str = ""
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    cumulative_logprob: float | None = None
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] | None = None


class Done(_Message, tag="done"):
    """Sent last when the request finished normally."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt's, found in vLLM's prefix cache
    reasoning_tokens: int = 0  # of the completion's, the reasoning's (a request that asked it read apart)


class Error(_Message, tag="error"):
    """The request failed on the engine; `status` is the HTTP status the gateway reports
    (ENGINE_DIED: the engine's vLLM core died under it, as if the engine's process had)."""

    message: str
    status: int = 500
    param: str | None = None


class TokenizeRequest(_Message):
    """A prompt (text or a conversation) to turn into token ids, as /generate would."""

    prompt: str | Chat
    add_special_tokens: bool = True  # a text prompt's BOS and the like (a chat's come from its template)
    token_strs: bool = False  # also each token's own string


class Tokens(_Message, tag="tokens"):
    """/tokenize's answer (then Done with the count)."""

    ids: list[int]
    max_model_len: int
    strs: list[str] | None = None


class DetokenizeRequest(_Message):
    ids: list[int]


class Text(_Message, tag="text"):
    """/detokenize's answer."""

    text: str


class EmbedRequest(_Message):
    """Inputs to embed with a pooling engine, each text or token ids; `dimensions` where the model
    has matryoshka embeddings."""

    request_id: str
    inputs: list[str | list[int]]
    dimensions: int | None = None


class Embedding(_Message, tag="embedding"):
    """One input's embedding: float32 values, little-endian (OpenAI's base64 form, before base64)."""

    index: int
    vector: bytes
    tokens: int


Frame = Prompt | Delta | Done | Error | Tokens | Text | Embedding


class EngineInfo(_Message):
    """What `GET /info` answers."""

    model: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None
    vllm_version: str
    device: str
    chat_template: bool = False  # whether /generate accepts a Chat prompt
    task: str = "generate"  # or "embed": a pooling engine, which answers /embed and not /generate


_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(Frame)


def encode(message: msgspec.Struct) -> bytes:
    """msgpack bytes of one message (a request or an info body)."""
    return _encoder.encode(message)


def encode_frame(frame: Frame) -> bytes:
    """One length-prefixed frame of a /generate response."""
    body = _encoder.encode(frame)
    return FRAME_HEADER.pack(len(body)) + body


def decode_frame(body: bytes) -> Frame:
    """A frame's body (without its length prefix)."""
    return _frame_decoder.decode(body)


class FrameSplitter:
    """Cuts a /generate response into frames as its bytes arrive, however they are chunked.

    One read of the socket usually holds many frames (a whole non-streamed answer often arrives
    in one); decoding them from a buffer costs one await per read instead of two per frame.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.unreadable: str | None = None  # why a frame did not decode; nothing after it is read

    def feed(self, data: bytes) -> list[Frame]:
        """Append `data`; return the frames now complete, in order. A frame that does not decode
        ends the reading: the frames before it are returned and `unreadable` says why."""
        if self.unreadable is not None:
            return []
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        pos, end = 0, len(buffer)
        with memoryview(buffer) as view:  # released before the buffer is trimmed
            while end - pos >= FRAME_HEADER.size:
                (size,) = FRAME_HEADER.unpack_from(view, pos)
                stop = pos + FRAME_HEADER.size + size
                if stop > end:
                    break
                try:
                    frames.append(_frame_decoder.decode(view[pos + FRAME_HEADER.size : stop]))
                except msgspec.MsgspecError as e:
                    self.unreadable = str(e)
                    break
                pos = stop
        del buffer[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


_M = TypeVar("_M", bound=msgspec.Struct)


def decoder(message_type: type[_M]) -> msgspec.msgpack.Decoder[_M]:
    """A reusable decoder for one message type."""
    return msgspec.msgpack.Decoder(message_type)
