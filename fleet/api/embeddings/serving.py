"""/v1/embeddings: a request planned (inputs, limits) and its answer, from one engine request to a
pooling engine (all inputs at once: vLLM batches them)."""

from __future__ import annotations

import array
import base64
import sys
from dataclasses import dataclass

import msgspec

from fleet.api import answers
from fleet.api.answers import FrameSource
from fleet.api.embeddings.protocol import Embedding, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from fleet.api.planning import NO_LIMITS
from fleet.api.rules import check_limits, prompt_list
from fleet.config.model import Limits, SamplingDefaults
from fleet.wire import protocol

_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class EmbedPlan:
    inputs: list[str | list[int]]
    dimensions: int | None
    base64: bool
    stream: bool = False  # an embedding is never streamed


def plan_embeddings(req: EmbeddingRequest, _defaults: SamplingDefaults, limits: Limits = NO_LIMITS) -> EmbedPlan:
    """The inputs as the engine takes them, within the model's limits (inputs per request, size)."""
    inputs = prompt_list(req.input, param="input")
    check_limits(limits, n=1, best_of=1, max_tokens=None, prompts=len(inputs), size=sum(len(i) for i in inputs),
                 prompt_param="input")
    return EmbedPlan(inputs, req.dimensions, req.encoding_format == "base64")


async def complete(source: FrameSource, plan: EmbedPlan, model: str) -> bytes:
    """The embeddings answer as JSON bytes."""
    req = protocol.EmbedRequest(answers.new_id("embd"), plan.inputs, plan.dimensions)
    vectors: dict[int, bytes] = {}
    prompt_tokens = 0
    async for batch in source.call("/embed", req):
        for frame in batch:
            match frame:
                case protocol.Embedding():
                    vectors[frame.index] = frame.vector
                case protocol.Done():
                    prompt_tokens = frame.prompt_tokens
                    source.count_tokens(0, prompt_tokens)
                case protocol.Error():
                    raise answers.frame_error(frame)
    data = [Embedding(i, base64.b64encode(v).decode() if plan.base64 else floats(v)) for i, v in sorted(vectors.items())]
    return _json.encode(EmbeddingResponse(data, model, EmbeddingUsage(prompt_tokens, prompt_tokens)))


def floats(vector: bytes) -> list[float]:
    """float32 little-endian bytes as numbers."""
    values = array.array("f", vector)
    if sys.byteorder != "little":
        values.byteswap()
    return values.tolist()
