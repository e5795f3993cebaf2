"""The gateway: a Litestar app with OpenAI's routes. Handlers only parse, route, call and shape.

Errors of every kind are `FleetError`s (fleet/errors.py) and leave through one handler that writes
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.

The routes to a model come from the endpoint folders' declarations (fleet.api.catalog.ENDPOINTS),
one `endpoint_route` each. They are Litestar ASGI handlers rather than typed ones: they read and
decode their own body (bodies.py) and send their answer to the ASGI server themselves. Litestar's
typed-handler layers (the signature model, kwargs, the before-request hook, `Response`) were
~50-70 us of the ~350-400 us of gateway CPU a request took on a slow 2-core VM. The routes keep
Litestar's routing and exception handlers. The OpenAPI document is fleet's own (openapi.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, asgi, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException, ValidationException
from litestar.handlers import ASGIRouteHandler
from litestar.params import FromPath
from litestar.response.base import ASGIResponse
from litestar.types import HTTPScope, Receive, Send

from fleet.api.answers import FrameSource
from fleet.api.catalog import ENDPOINTS
from fleet.api.endpoint import Caller, Endpoint
from fleet.api.protocol import ErrorResponse, ModelCard, ModelList
from fleet.api.responses.store import ResponseStore
from fleet.config.schema import GatewayConfig, UiConfig
from fleet.errors import BodyTooLarge, FleetError, InvalidRequest
from fleet.gateway import control as control_routes
from fleet.gateway import stored
from fleet.gateway.auth import Keys, check_host, require_key, scope_key
from fleet.gateway.bodies import decode_body, decoder
from fleet.gateway.control import Control
from fleet.gateway.guard import ConnectionCounts
from fleet.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fleet.gateway.metrics import Metrics
from fleet.gateway.model import ServedModel
from fleet.gateway.openapi import JSON, openapi_json
from fleet.gateway.recent import Recent, Trace, prompt_preview
from fleet.gateway.routing.keys import session_key
from fleet.gateway.routing.lookup import resolve
from fleet.gateway.status import Health
from fleet.gateway.tracking import Tracked
from fleet.gateway.ui import routes as ui_routes
from fleet.gateway.ui.gpus import Gpus, engines_on_gpus
from fleet.gateway.ui.history import History
from fleet.wire.asgi import header, read_body, unless_disconnected
from fleet.wire.client import is_loopback

log = logging.getLogger("fleet.gateway")
_json = msgspec.json.Encoder()


def error_response(error: FleetError) -> Response[bytes]:
    """OpenAI's error envelope with the error's status and headers."""
    body = ErrorResponse.of(error)
    return Response(_json.encode(body), status_code=error.status, media_type=JSON, headers=error.headers)


def _fleet_error_handler(_: Request[Any, Any, Any], exc: FleetError) -> Response[bytes]:
    return error_response(exc)


def _http_error_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    if exc.status_code == 413:
        limit: int = request.app.state.max_body_bytes
        return error_response(BodyTooLarge(limit))
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        message, param = _named_parameter(exc.extra[0])
        return error_response(InvalidRequest(message, param=param))
    return error_response(FleetError(
        str(exc.detail), status=exc.status_code, type="invalid_request_error" if exc.status_code < 500 else "server_error",
        headers=exc.headers,  # e.g. Allow on a 405
    ))


def _named_parameter(error: Any) -> tuple[str, str | None]:
    """A route parameter Litestar could not read (a query's `limit=abc`), as a message and the
    parameter's name: `limit: Expected `int`, got `str``."""
    if not isinstance(error, dict) or not isinstance(error.get("key"), str):
        return f"invalid request: {error}", None
    return f"{error['key']}: {error.get('message', 'invalid value')}", error["key"]


def _unexpected_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(FleetError(f"internal error: {type(exc).__name__}"))


@get("/health", sync_to_thread=False)
def health(state: State) -> Response[bytes]:
    """200 with each model's state; the gateway itself is up whenever it answers. Open without a key."""
    models: Mapping[str, ServedModel] = state.models
    body = Health("ok", {name: b.state.value for name, b in models.items()})
    return Response(_json.encode(body), media_type=JSON)


@get("/metrics", sync_to_thread=False, before_request=require_key)
def metrics(state: State) -> Response[bytes]:
    """Prometheus metrics: requests by status, latency, time to first token, tokens, engine states."""
    return Response(state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


@get("/v1/models", sync_to_thread=False, before_request=require_key)
def list_models(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """The fleet's models the caller may use, with the state of each engine."""
    models: Mapping[str, ServedModel] = state.models
    key = scope_key(request.scope)
    cards = [card for name, b in models.items() for card in (model_card(name, b, state.started),
                                                             *(adapter_card(a, b, state.started) for a in b.adapters))
             if key is None or key.models is None or card.id in key.models]
    return Response(_json.encode(ModelList(cards)), media_type=JSON)


@get("/v1/models/{model:path}", sync_to_thread=False, before_request=require_key)
def retrieve_model(request: Request[Any, Any, Any], state: State, model: FromPath[str]) -> Response[bytes]:
    """One model of the fleet, as in the list: what it serves and the state of its engines."""
    models: Mapping[str, ServedModel] = state.models
    name = model.lstrip("/")  # a model's name may hold slashes ("org/model"): the rest of the path
    Keys.allow(scope_key(request.scope), name)
    served, adapter = resolve(models, name)
    card = model_card(name, served, state.started) if adapter is None else adapter_card(adapter, served, state.started)
    return Response(_json.encode(card), media_type=JSON)


def model_card(name: str, served: ServedModel, created: int) -> ModelCard:
    return ModelCard(id=name, created=created, owned_by="fleet", state=served.state.value,
                     max_model_len=served.config.max_model_len, task=served.config.task)


def adapter_card(adapter: str, served: ServedModel, created: int) -> ModelCard:
    """A LoRA adapter as `vllm serve` lists one: its base as `parent`, the base's state."""
    return ModelCard(id=adapter, created=created, owned_by="fleet", state=served.state.value,
                     max_model_len=served.config.max_model_len, task=served.config.task, parent=served.name,
                     root=served.adapter_paths[adapter])


WHAT_IT_SERVES = {"generate": "a generation model: it serves /v1/completions and /v1/chat/completions",
                  "embed": "an embedding model: it serves /v1/embeddings"}


def check_task(served: ServedModel, endpoint: Endpoint) -> None:
    """An endpoint for generation or for embeddings, and a model of that kind (400 naming `model`)."""
    if endpoint.task is not None and served.config.task != endpoint.task:
        raise InvalidRequest(f"model {served.name!r} is {WHAT_IT_SERVES[served.config.task]}, not {endpoint.path}",
                             param="model", code="wrong_model_type")


def endpoint_route(endpoint: Endpoint) -> ASGIRouteHandler:
    """The POST route of an endpoint folder's declaration (fleet.api.catalog): it checks the key,
    reads the body as the endpoint's request, finds the model (one that serves the endpoint's task),
    plans the request and runs it (tracked endpoints inside the model's bookkeeping)."""
    body_of = decoder(endpoint.request)

    async def handle(scope: HTTPScope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "POST":
            if method == "OPTIONS":
                await ASGIResponse(status_code=204, headers={"Allow": "OPTIONS, POST"})(scope, receive, send)
                return
            raise MethodNotAllowedException(headers={"Allow": "POST, OPTIONS"})  # as Litestar's own routes
        state: State = scope["app"].state
        check_host(scope)
        keys: Keys = state.api_keys
        # The key before the body, as the other routes' hook: without a valid key, a 401 whatever the body.
        key = keys.check(header(scope, b"authorization")) if keys.enabled else None
        data: Any = decode_body(await read_body(scope, receive, state.max_body_bytes), body_of)
        model = data.model
        Keys.allow(key, model)
        served, adapter = resolve(state.models, model)
        check_task(served, endpoint)
        if adapter is not None:
            served.stats.adapters[adapter] += 1
        if not served.state.serving:
            await served.serving()  # 503, or (on demand) waits for its engines
        session = session_key(scope, served.config, getattr(data, "user", None))
        prompt = None
        try:
            if endpoint.resolve is not None:  # what it refers to, read (the caller's own only)
                data = await endpoint.resolve(data, Caller(key.id if key else "", state.responses))
            prompt = prompt_preview(endpoint.prompt(data)) if state.show_prompts and endpoint.prompt else None
            planned = endpoint.plan(data, served.config)
        except FleetError as e:  # refused before it ran: the status page lists it too
            if endpoint.tracked and (recent := state.recent) is not None:
                recent.add(Trace(at=time.time(), model=model, route=endpoint.label, status=e.status, prompt=prompt))
            raise
        source: FrameSource = served if session is None and adapter is None else served.keyed(session, adapter)
        if not endpoint.tracked:
            await _send_json(send, await unless_disconnected(receive, endpoint.complete(source, planned, model)))
            return
        tracked = Tracked(served, endpoint.label, state.metrics, state.recent, prompt)
        if endpoint.stream is not None and planned.stream:
            stream = endpoint.stream
            await tracked.send_stream(lambda: stream(source, planned, model), send, receive)
            return
        async with tracked:
            body = await unless_disconnected(receive, endpoint.complete(source, planned, model))
        await _send_json(send, body)

    handle.__name__ = handle.__qualname__ = endpoint.name
    return asgi(endpoint.path, name=endpoint.name, is_mount=False, copy_scope=False)(handle)


async def _send_json(send: Send, body: bytes) -> None:
    """A whole answer, straight to the ASGI server: the body is already encoded, and Litestar's
    response objects (header containers, cookies, background tasks) cost ~30-40 us of the ~350 us of
    gateway CPU a request takes on a slow 2-core VM. Errors before this are raised, and leave as
    plain HTTP errors through the app's exception handlers."""
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


ENDPOINT_ROUTES = [endpoint_route(e) for e in ENDPOINTS]


def create_app(
    models: Mapping[str, ServedModel],
    control: Control | None = None,
    *,
    keys: Keys | None = None,
    gateway: GatewayConfig | None = None,
    restarts: Callable[[str], int] = lambda _: 0,
    connections: ConnectionCounts | None = None,
    ui: UiConfig | None = None,
    admin_key: bytes | None = None,
    responses: ResponseStore | None = None,
) -> Litestar:
    """The gateway app over a fleet's models (their lifecycles and clients are owned by the launcher).
    With `ui` enabled (and a launcher: `control`) it serves the status page too, `admin_key` opening its actions."""
    gateway, ui = gateway or GatewayConfig(), ui or UiConfig()
    allowed_hosts = frozenset(name.lower().rstrip(".") for name in gateway.allowed_hosts)  # as check_host reads a Host
    with_ui = ui.enabled and control is not None
    history = History(lambda: models, Gpus(lambda: engines_on_gpus(control))) if with_ui and control else None
    sampler: list[asyncio.Task[None]] = []

    def start_sampling() -> None:
        if history is not None:
            sampler.append(asyncio.create_task(history.run(), name="ui-history"))

    async def stop_sampling() -> None:
        for task in sampler:
            task.cancel()
        await asyncio.gather(*sampler, return_exceptions=True)

    app = Litestar(
        route_handlers=[health, metrics, list_models, retrieve_model, *ENDPOINT_ROUTES, *stored.ROUTES,
                        *control_routes.ROUTES,
                        openapi_json, *(ui_routes.ROUTES if with_ui else ())],
        state=State({
            "models": models,
            "started": int(time.time()),
            "control": control,
            "api_keys": keys or Keys([]),
            # the Host names requests may give (auth.check_host): checked where the gateway has no keys
            # and listens on loopback; the control routes check them always
            "trusted_hosts": None if (keys and keys.enabled) or not is_loopback(gateway.host) else allowed_hosts,
            "allowed_hosts": allowed_hosts,
            "metrics": Metrics(lambda: models, restarts, connections),
            "max_body_bytes": gateway.max_body_bytes,
            "recent": Recent() if with_ui else None,
            "show_prompts": with_ui and ui.show_prompts,
            "ui_history": history,
            "ui_admin": admin_key if with_ui else None,
            "admin_key": admin_key,  # adapter loading's too
            "responses": responses,  # stored responses (None: /v1/responses stores nothing)
        }),
        on_startup=[start_sampling],
        on_shutdown=[stop_sampling],
        exception_handlers={
            FleetError: _fleet_error_handler,
            HTTPException: _http_error_handler,
            Exception: _unexpected_error_handler,
        },
        request_max_body_size=gateway.max_body_bytes,
        logging_config=None,
        openapi_config=None,  # the document is fleet's own, served by openapi_json (openapi.py)
    )
    return app

