"""What an endpoint folder declares (`Endpoint`): its path, its schemas, how a request is planned
and answered, and what the OpenAPI document says of it. The gateway builds its route table and its
OpenAPI document from these declarations (catalog.ENDPOINTS), so a new endpoint is a folder
`api/<endpoint>/` (protocol.py, serving.py, endpoint.py) and its line in catalog.py.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from fleet.api.answers import FrameSource
from fleet.api.responses.store import ResponseStore
from fleet.config.model import ModelConfig

Plan = Callable[[Any, ModelConfig], Any]  # request, the model it goes to -> what to do (a streaming one: with `stream`)
Complete = Callable[[FrameSource, Any, str], Awaitable[bytes]]
Stream = Callable[[FrameSource, Any, str], Awaitable[AsyncGenerator[bytes, None]]]


@dataclass(frozen=True)
class Endpoint:
    """One POST route to a model, as its folder declares it."""

    path: str  # "/v1/completions"
    name: str  # the route's name: its OpenAPI summary and operationId derive from it
    description: str  # what the OpenAPI document says it does
    request: type[msgspec.Struct]  # the body, decoded straight into it (gateway/bodies.py)
    response: type[msgspec.Struct]  # a whole answer
    answered: str  # what a 200 answer holds, for the document
    plan: Plan  # request, the model's settings -> what to do (every rule checked: a 400 here)
    complete: Complete  # a whole answer, as JSON bytes
    stream: Stream | None = None  # a streamed answer (SSE bytes); None: never streamed
    chunk: type[msgspec.Struct] | None = None  # a stream's event, for the document
    task: Literal["generate", "embed"] | None = "generate"  # the models it serves; None: every model
    tracked: bool = True  # a request of the model: admission slot, counts, metrics, the status page's list
    prompt: Callable[[Any], Any] | None = None  # what the status page shows of a request's prompt
    # what a request refers to, read before it is planned (a stored conversation it continues)
    resolve: Callable[[Any, Caller], Awaitable[Any]] | None = None
    route_name: str = ""  # its label in metrics and the status page ("completions"); default: `name`

    @property
    def label(self) -> str:
        return self.route_name or self.name


@dataclass(frozen=True)
class Caller:
    """Who asks, as an endpoint that keeps state needs to know it: the API key's id (what it may
    read; "" for a fleet without keys) and the gateway's response store (None: none kept)."""

    key: str = ""
    responses: ResponseStore | None = None
