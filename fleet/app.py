"""The gateway: a Litestar app with OpenAI's routes. Handlers only parse, route, call and shape.

Errors of every kind are `FleetError`s (errors.py) and leave through one handler that writes
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException
from litestar.response import Stream

from fleet import chat, completions
from fleet import control as control_routes
from fleet.control import Control
from fleet.errors import FleetError, InvalidRequest
from fleet.routing import Backend, route
from fleet.schemas import ChatCompletionRequest, CompletionRequest, ErrorBody, ErrorResponse, ModelCard, ModelList
from fleet.translate import Plan, plan_chat, plan_completion

log = logging.getLogger("fleet.gateway")
_json = msgspec.json.Encoder()
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_PATH = re.compile(r"at `\$\.?([^`]*)`")
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def decode_request(body: bytes, decoder: msgspec.json.Decoder) -> object:
    """Decode a JSON body; a wrong type or a malformed document is a 400 naming the field."""
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        match = _PATH.search(str(e))
        param = match.group(1) if match else None
        if param is None and (missing := re.search(r"missing required field `([^`]+)`", str(e))):
            param = missing.group(1)
        raise InvalidRequest(f"invalid request: {e}", param=param or None) from None
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None


def error_response(error: FleetError) -> Response[bytes]:
    """OpenAI's error envelope with the error's status and headers."""
    body = ErrorResponse(ErrorBody(error.message, error.type, error.param, error.code))
    return Response(_json.encode(body), status_code=error.status, media_type=JSON, headers=error.headers)


def _fleet_error_handler(_: Request, exc: FleetError) -> Response[bytes]:
    return error_response(exc)


def _http_error_handler(_: Request, exc: HTTPException) -> Response[bytes]:
    err = FleetError(str(exc.detail))
    err.status = exc.status_code
    err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(err)


def _unexpected_error_handler(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(FleetError(f"internal error: {type(exc).__name__}"))


@get("/health", sync_to_thread=False)
def health(state: State) -> Response[bytes]:
    """200 with each model's state; the gateway itself is up whenever it answers."""
    backends: Mapping[str, Backend] = state.backends
    body = {"status": "ok", "models": {name: b.lifecycle.state.value for name, b in backends.items()}}
    return Response(_json.encode(body), media_type=JSON)


@get("/v1/models", sync_to_thread=False)
def list_models(state: State) -> Response[bytes]:
    """The fleet's models, with the state of each engine."""
    backends: Mapping[str, Backend] = state.backends
    cards = [
        ModelCard(id=name, created=state.started, owned_by="fleet", state=b.lifecycle.state.value,
                  max_model_len=b.config.max_model_len)
        for name, b in backends.items()
    ]
    return Response(_json.encode(ModelList(cards)), media_type=JSON)


@post("/v1/completions", status_code=200, name="completions")
async def completions_route(request: Request, state: State) -> Response[bytes] | Stream:
    """OpenAI's legacy completions: parse, route, plan, run."""
    req: CompletionRequest = decode_request(await request.body(), _completion_decoder)  # type: ignore[assignment]
    backend = route(state.backends, req.model)
    return await _run(backend, plan_completion(req, backend.config.defaults), req.model, completions)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request, state: State) -> Response[bytes] | Stream:
    """OpenAI's chat completions: the engine renders the messages with the model's chat template."""
    req: ChatCompletionRequest = decode_request(await request.body(), _chat_decoder)  # type: ignore[assignment]
    backend = route(state.backends, req.model)
    return await _run(backend, plan_chat(req, backend.config.defaults), req.model, chat)


class _Api(Protocol):
    async def complete(self, backend: Backend, plan: Plan, model: str) -> bytes: ...
    async def stream(self, backend: Backend, plan: Plan, model: str) -> AsyncIterator[bytes]: ...


async def _run(backend: Backend, plan: Plan, model: str, api: _Api) -> Response[bytes] | Stream:
    """Run a planned request, counted in flight until its last byte (reload drains on this count)."""
    backend.stats.begin()
    if not plan.stream:
        try:
            return Response(await api.complete(backend, plan, model), media_type=JSON)
        finally:
            backend.stats.end()
    try:
        body = await api.stream(backend, plan, model)
    except BaseException:
        backend.stats.end()
        raise
    return Stream(_counted(body, backend), media_type="text/event-stream", headers=SSE_HEADERS)


async def _counted(body: AsyncIterator[bytes], backend: Backend) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        backend.stats.end()


def create_app(backends: Mapping[str, Backend], control: Control | None = None) -> Litestar:
    """The gateway app over a fleet's backends (their lifecycles are owned by the launcher)."""

    async def close_clients() -> None:
        for b in backends.values():
            await b.client.close()

    return Litestar(
        route_handlers=[health, list_models, completions_route, chat_completions, *control_routes.ROUTES],
        state=State({"backends": backends, "started": int(time.time()), "control": control}),
        exception_handlers={
            FleetError: _fleet_error_handler,
            HTTPException: _http_error_handler,
            Exception: _unexpected_error_handler,
        },
        on_shutdown=[close_clients],
        logging_config=None,
    )
