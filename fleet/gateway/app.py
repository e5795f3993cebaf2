"""The gateway: a Litestar app with OpenAI's routes. Handlers only parse, route, call and shape.

Errors of every kind are `FleetError`s (fleet/errors.py) and leave through one handler that writes
OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.

The two generation routes are Litestar ASGI handlers rather than typed ones: they read and decode
their own body (bodies.py) and send their answer to the ASGI server themselves. Litestar's
typed-handler layers (the signature model, kwargs, the before-request hook, `Response`) were
~50-70 us of the ~350-400 us of gateway CPU a request took on a slow 2-core VM. The routes keep
Litestar's routing and exception handlers. The OpenAPI document is fleet's own (openapi.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import msgspec
from litestar import Litestar, Request, Response, asgi, get, post
from litestar.datastructures import State
from litestar.exceptions import HTTPException, MethodNotAllowedException
from litestar.handlers import ASGIRouteHandler
from litestar.params import FromPath
from litestar.response.base import ASGIResponse
from litestar.types import HTTPScope, Receive, Send

from fleet.api.answers import Engine
from fleet.api.chat import serving as chat
from fleet.api.chat.protocol import ChatCompletionRequest
from fleet.api.completions import serving as completions
from fleet.api.completions.protocol import CompletionRequest
from fleet.api.embeddings import serving as embeddings
from fleet.api.embeddings.protocol import EmbeddingRequest
from fleet.api.protocol import ErrorResponse, ModelCard, ModelList
from fleet.api.tokens import serving as token_serving
from fleet.api.tokens.protocol import DetokenizeRequest, TokenizeRequest
from fleet.config.schema import GatewayConfig, UiConfig
from fleet.errors import BodyTooLarge, FleetError, InvalidRequest
from fleet.gateway import control as control_routes
from fleet.gateway.auth import Keys, require_key, scope_key
from fleet.gateway.bodies import decode_body, decoder
from fleet.gateway.control import Control
from fleet.gateway.guard import ConnectionCounts
from fleet.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fleet.gateway.metrics import Metrics
from fleet.gateway.model import ServedModel
from fleet.gateway.openapi import JSON, openapi_json
from fleet.gateway.recent import Recent, Trace, prompt_preview
from fleet.gateway.routing.lookup import find, route
from fleet.gateway.status import Health
from fleet.gateway.tracking import Tracked
from fleet.gateway.ui import routes as ui_routes
from fleet.gateway.ui.gpus import Gpus, engines_on_gpus
from fleet.gateway.ui.history import History
from fleet.wire.asgi import header, read_body, unless_disconnected

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
    return error_response(FleetError(
        str(exc.detail), status=exc.status_code, type="invalid_request_error" if exc.status_code < 500 else "server_error",
        headers=exc.headers,  # e.g. Allow on a 405
    ))


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
    cards = [model_card(name, b, state.started) for name, b in models.items()
             if key is None or key.models is None or name in key.models]
    return Response(_json.encode(ModelList(cards)), media_type=JSON)


@get("/v1/models/{model:path}", sync_to_thread=False, before_request=require_key)
def retrieve_model(request: Request[Any, Any, Any], state: State, model: FromPath[str]) -> Response[bytes]:
    """One model of the fleet, as in the list: what it serves and the state of its engines."""
    models: Mapping[str, ServedModel] = state.models
    name = model.lstrip("/")  # a model's name may hold slashes ("org/model"): the rest of the path
    Keys.allow(scope_key(request.scope), name)
    return Response(_json.encode(model_card(name, find(models, name), state.started)), media_type=JSON)


def model_card(name: str, served: ServedModel, created: int) -> ModelCard:
    return ModelCard(id=name, created=created, owned_by="fleet", state=served.state.value,
                     max_model_len=served.config.max_model_len, task=served.config.task)


WHAT_IT_SERVES = {"generate": "a generation model: it serves /v1/completions and /v1/chat/completions",
                  "embed": "an embedding model: it serves /v1/embeddings"}


def check_task(served: ServedModel, task: str, path: str) -> None:
    """A route for generation or for embeddings, and a model of that kind (400 naming `model`)."""
    if served.config.task != task:
        raise InvalidRequest(f"model {served.name!r} is {WHAT_IT_SERVES[served.config.task]}, not {path}",
                             param="model", code="wrong_model_type")


def generation_route(path: str, name: str, schema: type[CompletionRequest | ChatCompletionRequest | EmbeddingRequest],
                     plan: Callable[..., Planned], api: _Api, route_name: str,
                     task: str = "generate") -> ASGIRouteHandler:
    """A POST route that reads its body as `schema`, routes it to its model (one that does `task`),
    plans and runs it."""
    body_of = decoder(schema)

    async def handle(scope: HTTPScope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "POST":
            if method == "OPTIONS":
                await ASGIResponse(status_code=204, headers={"Allow": "OPTIONS, POST"})(scope, receive, send)
                return
            raise MethodNotAllowedException(headers={"Allow": "POST, OPTIONS"})  # as Litestar's own routes
        state: State = scope["app"].state
        keys: Keys = state.api_keys
        # The key before the body, as the other routes' hook: without a valid key, a 401 whatever the body.
        key = keys.check(header(scope, b"authorization")) if keys.enabled else None
        data = decode_body(await read_body(scope, receive, state.max_body_bytes), body_of)
        Keys.allow(key, data.model)
        served = route(state.models, data.model)
        check_task(served, task, path)
        try:
            planned = plan(data, served.config.defaults, served.config.limits)
        except FleetError as e:  # refused before it ran: the status page lists it too
            if (recent := state.recent) is not None:
                recent.add(Trace(at=time.time(), model=data.model, route=route_name, status=e.status,
                                 prompt=shown_prompt(data) if state.show_prompts else None))
            raise
        engine: Engine = served
        if served.config.routing == "session":  # the same session to the same replica
            named = header(scope, served.config.session_header.lower().encode()) if served.config.session_header else None
            session = named or data.user
            engine = served.keyed(session.encode() if session else None)
        prompt = shown_prompt(data) if state.show_prompts else None
        await _run(receive, send, state, served, engine, planned, data.model, api, route_name, prompt)

    handle.__name__ = handle.__qualname__ = name
    return asgi(path, name=name, is_mount=False, copy_scope=False)(handle)


class Planned(Protocol):
    """A request planned by its endpoint (api/<endpoint>/serving.py): whether it streams, and the rest."""

    @property
    def stream(self) -> bool: ...


class _Api(Protocol):
    async def complete(self, engine: Engine, plan: Any, model: str) -> bytes: ...
    def stream(self, engine: Engine, plan: Any, model: str) -> Any: ...


def shown_prompt(data: CompletionRequest | ChatCompletionRequest | EmbeddingRequest) -> str:
    """What the status page shows of a request's prompt ([ui] show_prompts): a completion's
    prompt, an embedding's input, a chat's last message."""
    if isinstance(data, CompletionRequest):
        return prompt_preview(data.prompt)
    if isinstance(data, EmbeddingRequest):
        return prompt_preview(data.input)
    content = data.messages[-1].content
    if isinstance(content, list):
        content = " ".join(part.text or "" for part in content)
    return prompt_preview(content or "")


async def _run(receive: Receive, send: Send, state: State, served: ServedModel, engine: Engine, plan: Any, model: str,
               api: _Api, route_name: str, prompt: str | None = None) -> None:
    """Run a planned request in its bookkeeping (slot, in-flight count, metrics, disconnects); send the answer.

    The answer goes to the ASGI server as is: the body is already encoded, and Litestar's response
    objects (header containers, cookies, background tasks) cost ~30-40 us of the ~350 us of gateway
    CPU a request takes on a slow 2-core VM. Errors before the first byte are raised, and leave as
    plain HTTP errors through the app's exception handlers.
    """
    tracked = Tracked(served, route_name, state.metrics, state.recent, prompt)
    if plan.stream:
        await tracked.send_stream(lambda: api.stream(engine, plan, model), send, receive)
        return
    async with tracked:
        body = await unless_disconnected(receive, api.complete(engine, plan, model))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


completions_route = generation_route("/v1/completions", "completions", CompletionRequest, completions.plan_completion,
                                     completions, "completions")
chat_completions = generation_route("/v1/chat/completions", "chat_completions", ChatCompletionRequest, chat.plan_chat,
                                    chat, "chat")
embeddings_route = generation_route("/v1/embeddings", "embeddings", EmbeddingRequest, embeddings.plan_embeddings,
                                    embeddings, "embeddings", task="embed")
_tokenize_body, _detokenize_body = decoder(TokenizeRequest), decoder(DetokenizeRequest)


@post("/tokenize", status_code=200, before_request=require_key)
async def tokenize_route(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """vLLM's /tokenize: a prompt's (or a chat's, through the model's template) token ids, as the
    model's engine counts them; `count` is the `prompt_tokens` a request with it would report."""
    data = decode_body(await request.body(), _tokenize_body)
    Keys.allow(scope_key(request.scope), data.model)
    return Response(await token_serving.tokenize(route(state.models, data.model), data), media_type=JSON)


@post("/detokenize", status_code=200, before_request=require_key)
async def detokenize_route(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """vLLM's /detokenize: the text of token ids."""
    data = decode_body(await request.body(), _detokenize_body)
    Keys.allow(scope_key(request.scope), data.model)
    return Response(await token_serving.detokenize(route(state.models, data.model), data), media_type=JSON)


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
) -> Litestar:
    """The gateway app over a fleet's models (their lifecycles and clients are owned by the launcher).
    With `ui` enabled (and a launcher: `control`) it serves the status page too, `admin_key` opening its actions."""
    gateway, ui = gateway or GatewayConfig(), ui or UiConfig()
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
        route_handlers=[health, metrics, list_models, retrieve_model, completions_route, chat_completions,
                        embeddings_route, tokenize_route, detokenize_route, *control_routes.ROUTES,
                        openapi_json, *(ui_routes.ROUTES if with_ui else ())],
        state=State({
            "models": models,
            "started": int(time.time()),
            "control": control,
            "api_keys": keys or Keys([]),
            "metrics": Metrics(lambda: models, restarts, connections),
            "max_body_bytes": gateway.max_body_bytes,
            "recent": Recent() if with_ui else None,
            "show_prompts": with_ui and ui.show_prompts,
            "ui_history": history,
            "ui_admin": admin_key if with_ui else None,
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

