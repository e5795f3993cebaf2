"""The gateway: a Litestar app with OpenAI's routes. Handlers only parse, route, call and shape.

Errors of every kind are `FleetError`s (errors.py) and leave through one handler that writes
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from typing import Protocol

import msgspec
from litestar import Litestar, Request, Response, get, post
from litestar._openapi.plugin import OpenAPIPlugin  # not exported; the fuzz tests read what it builds
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPI, Reference
from litestar.params import JSONBody
from litestar.plugins import PluginProtocol
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import ASGIApp, Receive, Send

from fleet import chat, completions
from fleet import control as control_routes
from fleet.auth import Keys, require_key
from fleet.config import GatewayConfig
from fleet.control import Control
from fleet.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fleet.metrics import Metrics
from fleet.tracking import ClientDisconnected, Tracked, unless_disconnected
from fleet.errors import FleetError, InvalidRequest
from fleet.routing import Backend, route
from fleet.envelope import ErrorBody, ErrorResponse
from fleet.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    Health,
    ModelCard,
    ModelList,
)
from fleet.translate import Plan, plan_chat, plan_completion

log = logging.getLogger("fleet.gateway")
_json = msgspec.json.Encoder()
_MISSING = re.compile(r"missing required field `([^`]+)`")
JSON = "application/json"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
ERROR_RESPONSES = {
    status: ResponseSpec(ErrorResponse, description=what, generate_examples=False)
    for status, what in [
        (400, "invalid request (the `param` names the field)"),
        (401, "missing or invalid API key"),
        (403, "this API key may not use the model"),
        (404, "no such model in the fleet"),
        (405, "method not allowed"),
        (413, "request body larger than max_body_bytes"),
        (429, "the model is at capacity; see Retry-After"),
        (502, "the engine failed while holding the request"),
        (503, "the model's engine is not ready; see Retry-After"),
        (504, "the engine stopped answering"),
    ]
}


def invalid_body(exc: ValidationException) -> InvalidRequest:
    """Litestar's report of a body msgspec refused, as a 400 naming the field."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    first = problems[0] if problems and isinstance(problems[0], dict) else {}
    message = str(first.get("message") or exc.detail)
    key = first.get("key")
    if message in ("'data'", "data") or (not problems and "data" in message):
        return InvalidRequest("the request body is empty: send a JSON object")
    if key in (None, "data", "body"):
        missing = _MISSING.search(message)
        key = missing.group(1) if missing else None
    if "truncated" in message or "malformed" in message.lower() or "invalid json" in message.lower():
        return InvalidRequest(f"the request body is not valid JSON: {message}")
    where = f" (at `{key}`)" if key else ""
    return InvalidRequest(f"invalid request: {message}{where}", param=key)


def error_response(error: FleetError) -> Response[bytes]:
    """OpenAI's error envelope with the error's status and headers."""
    body = ErrorResponse(ErrorBody(error.message, error.type, error.param, error.code))
    return Response(_json.encode(body), status_code=error.status, media_type=JSON, headers=error.headers)


def _fleet_error_handler(_: Request, exc: FleetError) -> Response[bytes]:
    return error_response(exc)


def _validation_error_handler(_: Request, exc: ValidationException) -> Response[bytes]:
    return error_response(invalid_body(exc))


def _caused_by(exc: BaseException, kind: type[BaseException]) -> bool:
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, kind):
            return True
        cause = cause.__cause__
    return False


def _http_error_handler(request: Request, exc: HTTPException) -> Response[bytes]:
    if _caused_by(exc, msgspec.DecodeError):
        return error_response(InvalidRequest(f"the request body is not valid JSON: {exc.detail}"))
    err = FleetError(str(exc.detail))
    err.status = exc.status_code
    err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    if exc.status_code == 413:
        limit = request.app.state.get("max_body_bytes")
        err.message = f"the request body is larger than the gateway's max_body_bytes ({limit} bytes)"
    response = error_response(err)
    for name, value in (exc.headers or {}).items():  # e.g. Allow on a 405
        response.headers[name] = value
    return response


def _recursion_error_handler(_: Request, exc: RecursionError) -> Response[bytes]:
    return error_response(InvalidRequest("the request body's JSON is nested too deeply"))


def _unicode_error_handler(_: Request, exc: UnicodeDecodeError) -> Response[bytes]:
    return error_response(InvalidRequest(f"the request body is not valid UTF-8 JSON: {exc.reason} at byte {exc.start}"))


def _unexpected_error_handler(request: Request, exc: Exception) -> Response[bytes]:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(FleetError(f"internal error: {type(exc).__name__}"))


def _ok(kind: type, what: str, media_type: str = JSON) -> dict[int, ResponseSpec]:
    """The documented 200 of a handler that returns pre-encoded bytes (Litestar would say "string")."""
    return {200: ResponseSpec(kind, description=what, generate_examples=False, media_type=media_type)}


@get("/health", sync_to_thread=False, responses=_ok(Health, "the gateway is up; each model's engine state"))
def health(state: State) -> Response[bytes]:
    """200 with each model's state; the gateway itself is up whenever it answers. Open without a key."""
    backends: Mapping[str, Backend] = state.backends
    body = Health("ok", {name: b.lifecycle.state.value for name, b in backends.items()})
    return Response(_json.encode(body), media_type=JSON)


@get("/metrics", sync_to_thread=False, before_request=require_key,
     responses={**ERROR_RESPONSES, **_ok(str, "Prometheus text exposition format", METRICS_CONTENT_TYPE)})
def metrics(state: State) -> Response[bytes]:
    """Prometheus metrics: requests by status, latency, time to first token, tokens, engine states."""
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@get("/v1/models", sync_to_thread=False, before_request=require_key,
     responses={**ERROR_RESPONSES, **_ok(ModelList, "the models this key may use")})
def list_models(request: Request, state: State) -> Response[bytes]:
    """The fleet's models the caller may use, with the state of each engine."""
    backends: Mapping[str, Backend] = state.backends
    key = request.scope.get("fleet_key")
    cards = [
        ModelCard(id=name, created=state.started, owned_by="fleet", state=b.lifecycle.state.value,
                  max_model_len=b.config.max_model_len)
        for name, b in backends.items()
        if key is None or key.models is None or name in key.models
    ]
    return Response(_json.encode(ModelList(cards)), media_type=JSON)


@post("/v1/completions", status_code=200, name="completions", before_request=require_key,
      responses={**ERROR_RESPONSES, **_ok(CompletionResponse, "the completion; with stream: true, server-sent events")})
async def completions_route(data: JSONBody[CompletionRequest], request: Request, state: State) -> ASGIApp:
    """OpenAI's legacy completions: parse, route, plan, run."""
    backend = _backend(request, state, data.model)
    plan = plan_completion(data, backend.config.defaults, backend.config.limits)
    return await _run(request, state, backend, plan, data.model, completions, "completions")


@post("/v1/chat/completions", status_code=200, before_request=require_key,
      responses={**ERROR_RESPONSES, **_ok(ChatCompletionResponse, "the chat completion; with stream: true, server-sent events")})
async def chat_completions(data: JSONBody[ChatCompletionRequest], request: Request, state: State) -> ASGIApp:
    """OpenAI's chat completions: the engine renders the messages with the model's chat template."""
    backend = _backend(request, state, data.model)
    plan = plan_chat(data, backend.config.defaults, backend.config.limits)
    return await _run(request, state, backend, plan, data.model, chat, "chat")


def _backend(request: Request, state: State, model: str) -> Backend:
    Keys.allow(request.scope.get("fleet_key"), model)
    return route(state.backends, model)


class _Api(Protocol):
    async def complete(self, backend: Backend, plan: Plan, model: str) -> bytes: ...
    async def stream(self, backend: Backend, plan: Plan, model: str) -> AsyncIterator[bytes]: ...


async def _run(request: Request, state: State, backend: Backend, plan: Plan, model: str, api: _Api,
               route_name: str) -> ASGIApp:
    """Run a planned request inside its bookkeeping (slot, in-flight count, metrics, disconnects).

    The answer is Litestar's ASGI response itself, not a `Response` it would turn into one: the
    body is already encoded, and that conversion cost ~30 us of the ~400 us of gateway CPU a
    request takes on a slow 2-core VM (handlers annotated `ASGIApp` are passed through as is).
    """
    tracked = Tracked(backend, route_name, state.metrics)
    if not plan.stream:
        async with tracked:
            body = await unless_disconnected(request.receive, api.complete(backend, plan, model))
        return ASGIResponse(body=body, media_type=JSON)
    await tracked.__aenter__()
    try:
        stream = await unless_disconnected(request.receive, api.stream(backend, plan, model))
    except BaseException as e:
        await tracked.__aexit__(type(e), e, None)
        raise
    return SSEResponse(tracked.stream(stream))


class SSEResponse(ASGIStreamingResponse):
    """Server-sent events, sent from the handler's own task; the client leaving ends the stream.

    Litestar's streaming response runs every body in an anyio task group beside a task that
    listens for the disconnect, ~95 us per stream on a 2-core VM (`bench/inprocess.py --stream`).
    Here one watcher task cancels the sending when the client goes (`unless_disconnected`, as
    for whole answers), and the events are closed at once however the stream ends: that closes
    the engine connection, which aborts the engine's request.
    """

    __slots__ = ()

    def __init__(self, events: AsyncGenerator[bytes, None]) -> None:
        super().__init__(iterator=events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def send_body(self, send: Send, receive: Receive) -> None:
        events: AsyncGenerator[bytes, None] = self.iterator  # type: ignore[assignment]
        try:
            await unless_disconnected(receive, _send_events(events, send))
        except ClientDisconnected:
            pass  # nobody left to answer
        finally:
            await events.aclose()


async def _send_events(events: AsyncIterator[bytes], send: Send) -> None:
    async for chunk in events:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Gateway(Litestar):
    """Litestar without its default pydantic and attrs plugins: the gateway's types are all msgspec,
    and importing those plugins (pydantic.v1, attrs) was ~0.08 s of its start."""

    @staticmethod
    def _get_default_plugins(plugins: list[PluginProtocol]) -> list[PluginProtocol]:
        from litestar.plugins.core import MsgspecDIPlugin

        return [*plugins, MsgspecDIPlugin()]


def create_app(
    backends: Mapping[str, Backend],
    control: Control | None = None,
    *,
    keys: Keys | None = None,
    gateway: GatewayConfig | None = None,
    restarts: Callable[[str], int] = lambda _: 0,
) -> Litestar:
    """The gateway app over a fleet's backends (their lifecycles are owned by the launcher)."""
    gateway = gateway or GatewayConfig()

    async def close_clients() -> None:
        for b in backends.values():
            await b.client.close()

    app = _Gateway(
        route_handlers=[health, metrics, list_models, completions_route, chat_completions, *control_routes.ROUTES],
        state=State({
            "backends": backends,
            "started": int(time.time()),
            "control": control,
            "api_keys": keys or Keys([]),
            "metrics": Metrics(lambda: backends, restarts),
            "max_body_bytes": gateway.max_body_bytes,
        }),
        exception_handlers={
            FleetError: _fleet_error_handler,
            ValidationException: _validation_error_handler,
            HTTPException: _http_error_handler,
            RecursionError: _recursion_error_handler,
            UnicodeDecodeError: _unicode_error_handler,
            Exception: _unexpected_error_handler,
        },
        request_max_body_size=gateway.max_body_bytes,
        on_shutdown=[close_clients],
        logging_config=None,
    )
    # The document is built on its first request, not here (~0.1 s of the gateway's start):
    # Litestar's plugin has no hook for what it cannot infer, so its class gains one.
    app.plugins.get(OpenAPIPlugin).__class__ = _OpenAPIWithStreams
    return app


STREAMS = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


class _OpenAPIWithStreams(OpenAPIPlugin):
    """Litestar's OpenAPI plugin, plus the stream form of the generation routes' answers."""

    __slots__ = ()

    def provide_openapi(self) -> OpenAPI:
        """The document, built once on first use."""
        first = self._openapi is None
        document = super().provide_openapi()
        if first:
            _document_streams(document)
        return document


def _document_streams(document: OpenAPI) -> None:
    """Both generation routes answer 200 as JSON or, with stream: true, as server-sent events.

    Each event is described as OpenAPI 3.1 reads a sequential media type: an object whose `data` is
    either `[DONE]` or a JSON chunk (or, after a failure mid-stream, OpenAI's error envelope).
    """
    from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, Schema
    from litestar.openapi.spec.enums import OpenAPIType

    ref = "#/components/schemas/{name}"
    refs, components = msgspec.json.schema_components([*STREAMS.values(), ErrorResponse], ref_template=ref)
    if document.components.schemas is not None:
        for name, schema in components.items():  # Litestar already has the shared parts, same shape
            document.components.schemas.setdefault(name, schema)  # type: ignore[arg-type]
    for (path, _), chunk in zip(STREAMS.items(), refs):
        item = document.paths[path] if document.paths else None
        responses = item.post.responses if item and item.post and item.post.responses else {}
        ok = responses.get("200")
        if ok is not None and not isinstance(ok, Reference) and ok.content is not None:
            ok.content["text/event-stream"] = OpenAPIMediaType(schema={  # type: ignore[arg-type]
                "type": "object",
                "required": ["data"],
                "description": "`data: <chunk JSON>` events, then `data: [DONE]`",
                "properties": {"data": {"anyOf": [
                    {"const": "[DONE]"},
                    {"type": "string", "contentMediaType": JSON,
                     "contentSchema": {"anyOf": [chunk, refs[-1]]}},
                ]}},
            })
        for status in ("429", "503"):  # the SDK retries these after Retry-After seconds
            busy = responses.get(status)
            if busy is not None and not isinstance(busy, Reference):
                busy.headers = {"Retry-After": OpenAPIHeader(
                    schema=Schema(type=OpenAPIType.INTEGER), required=True, description="seconds to wait")}
