"""The gateway's OpenAPI 3.1 document, and the one route that serves it: GET /schema/openapi.json.

What this module owns:
- the document's every entry: the routes app.py and control.py serve (paths, methods, summaries
  and operationIds as Litestar once wrote them, descriptions from the handlers' docstrings), their
  request bodies and their answers; the routes to a model, from their endpoint folders'
  declarations (fleet.api.catalog.ENDPOINTS: path, schemas, description);
- its schemas, written by msgspec (`msgspec.json.schema_components`) from the very Structs the
  gateway decodes and encodes, so the document and the validation cannot drift apart;
- what no signature says: OpenAI's error envelope on every error status, the generation routes'
  second answer (server-sent events, with `stream: true`) and Retry-After on their 429 and 503,
  which the openai SDK honours.

Litestar's OpenAPI machinery is off (`openapi_config=None` in app.py): no plugin, no private hook.
The document is built on its first request, not at start (~0.1 s of the gateway's start), from
the app that serves it (its routes' docstrings), then kept in the app's state as the JSON it is
served as. Open without a key, as before; /schema/openapi.json is not
itself in the document.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, get

from fleet import __version__
from fleet.api.catalog import ENDPOINTS
from fleet.api.protocol import ErrorResponse, ModelCard, ModelList
from fleet.api.responses.protocol import DeletedResponse, InputItemList
from fleet.api.responses.protocol import Response as ResponseObject
from fleet.gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from fleet.gateway.status import FleetStatus, Health, ReloadReport

JSON = "application/json"
OPENAPI_JSON = "application/vnd.oai.openapi+json"  # what Litestar served it as
PATH = "/schema/openapi.json"

ERRORS = {  # every error status the OpenAI routes document, each with the envelope
    400: "invalid request (the `param` names the field)",
    401: "missing or invalid API key",
    403: "this API key may not use the model",
    404: "no such model in the fleet",
    405: "method not allowed",
    413: "request body larger than max_body_bytes",
    431: "request headers larger than max_header_bytes",
    429: "the model is at capacity; see Retry-After",
    502: "the engine failed while holding the request",
    503: "the model's engine is not ready; see Retry-After",
    504: "the engine stopped answering",
}
CONTROL_ERRORS = {  # control.py's: Forbidden, InvalidRequest, and the keys' check
    400: "no launcher behind this gateway, or (reload) a fleet.toml refused: nothing changed",
    401: "missing or invalid API key",
    403: "not a client on the gateway's machine, or a key limited to some models",
}
RETRY_AFTER = (429, 503)  # the SDK retries these after Retry-After seconds

STRUCTS: list[type] = list(dict.fromkeys([  # every schema the document refers to, each once
    *(t for e in ENDPOINTS for t in (e.request, e.response, e.chunk) if t is not None),
    ModelList, ModelCard, DeletedResponse, InputItemList, Health, FleetStatus, ReloadReport, ErrorResponse]))


@get(PATH, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The gateway's OpenAPI document."""
    return Response(encoded(request.app), media_type=OPENAPI_JSON)


def document(app: Litestar) -> dict[str, Any]:
    """The document as GET /schema/openapi.json serves it (a fresh copy, decoded from those bytes)."""
    doc: dict[str, Any] = msgspec.json.decode(encoded(app))
    return doc


def encoded(app: Litestar) -> bytes:
    """The document of `app` as JSON, built on first use and kept in the app's state."""
    body: bytes | None = app.state.get("openapi")
    if body is None:
        body = app.state["openapi"] = msgspec.json.encode(_build(_descriptions(app)))
    return body


def _descriptions(app: Litestar) -> dict[str, str]:
    """Each served route's description: its handler's docstring, by path."""
    out: dict[str, str] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            doc = getattr(handler.fn, "__doc__", None)
            if doc:
                out.setdefault(route.path, inspect.cleandoc(doc))
    return out


def _build(described: Mapping[str, str]) -> dict[str, Any]:
    refs, schemas = msgspec.json.schema_components(STRUCTS, ref_template="#/components/schemas/{name}")
    ref: dict[type, dict[str, Any]] = dict(zip(STRUCTS, refs, strict=True))
    return {
        "openapi": "3.1.0",
        "info": {"title": "fleet", "version": __version__,
                 "description": "One OpenAI-compatible endpoint for a fleet of vLLM models."},
        "servers": [{"url": "/"}],
        "paths": _paths(ref, described),
        "components": {"schemas": schemas},
    }


def _paths(ref: Mapping[type, dict[str, Any]], described: Mapping[str, str]) -> dict[str, Any]:
    """Every route, in the order the app routes them."""
    error = ref[ErrorResponse]
    paths: dict[str, Any] = {
        "/health": {"get": _operation("/health", "health", described.get("/health", ""), {
            200: _answer("the gateway is up; each model's engine state", ref[Health])})},
        "/metrics": {"get": _operation("/metrics", "metrics", described.get("/metrics", ""), {
            200: _answer("Prometheus text exposition format", {"type": "string"}, METRICS_CONTENT_TYPE),
            **_errors(ERRORS, error)})},
        "/v1/models": {"get": _operation("/v1/models", "list_models", described.get("/v1/models", ""), {
            200: _answer("the models this key may use", ref[ModelList]), **_errors(ERRORS, error)})},
        "/v1/models/{model}": {"get": {
            **_operation("/v1/models/{model}", "retrieve_model", described.get("/v1/models/{model:path}", ""), {
                200: _answer("the model", ref[ModelCard]),
                **_errors({status: ERRORS[status] for status in (401, 403, 404, 405)}, error)}),
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                            "description": "the model's name (it may hold slashes)"}]}},
    }
    for e in ENDPOINTS:
        ok = _answer(e.answered + ("; with stream: true, server-sent events" if e.chunk else ""), ref[e.response])
        if e.chunk is not None:
            ok["content"]["text/event-stream"] = {"schema": _events(ref[e.chunk], error)}
        paths[e.path] = {"post": _operation(e.path, e.name, e.description, {
            200: ok, **_errors(ERRORS, error, RETRY_AFTER)}, body=ref[e.request])}
    stored_errors = _errors({status: ERRORS[status] for status in (401, 404, 405)} | {
        404: "no stored response with that id for this API key"}, error)
    response_id = [{"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"},
                    "description": "a stored response's id (resp_...)"}]
    paths["/v1/responses/{response_id}"] = {
        "get": {**_operation("/v1/responses/{response_id}", "retrieve_response", "A stored response, as it was answered.",
                             {200: _answer("the stored response", ref[ResponseObject]), **stored_errors}),
                "parameters": response_id},
        "delete": {**_operation("/v1/responses/{response_id}", "delete_response",
                                "Forget a stored response (a conversation can no longer continue from it).",
                                {200: _answer("the response is forgotten", ref[DeletedResponse]), **stored_errors}),
                   "parameters": response_id}}
    paths["/v1/responses/{response_id}/input_items"] = {"get": {
        **_operation("/v1/responses/{response_id}/input_items", "list_input_items",
                     described.get("/v1/responses/{response_id:str}/input_items", ""),
                     {200: _answer("the stored response's input items", ref[InputItemList]),
                      **stored_errors, 400: _answer("a limit out of range, an unknown `after`", error)}),
        "parameters": [*response_id,
                       {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
                       {"name": "order", "in": "query", "schema": {"enum": ["asc", "desc"]}},
                       {"name": "after", "in": "query", "schema": {"type": "string"}}]}}
    stopping = {"type": "object", "required": ["stopping"], "properties": {"stopping": {"const": True}}}
    paths |= {
        "/fleet/status": {"get": _operation("/fleet/status", "fleet_status", described.get("/fleet/status", ""), {
            200: _answer("the fleet's state, model by model", ref[FleetStatus]), **_errors(CONTROL_ERRORS, error)})},
        "/fleet/reload": {"post": _operation("/fleet/reload", "fleet_reload", described.get("/fleet/reload", ""), {
            200: _answer("what the reload changed", ref[ReloadReport]), **_errors(CONTROL_ERRORS, error)})},
        "/fleet/stop": {"post": _operation("/fleet/stop", "fleet_stop", described.get("/fleet/stop", ""), {
            202: _answer("the fleet is stopping", stopping), **_errors(CONTROL_ERRORS, error)})},
    }
    return paths


def _operation(path: str, name: str, what: str, answers: dict[int, dict[str, Any]],
               body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One operation, described by `what`. The summary and operationId are those Litestar derived
    from the handler's name: clients generated from them keep working."""
    summary = "".join(word.capitalize() for word in name.split("_"))
    operation: dict[str, Any] = {
        "summary": summary,
        "description": what,
        "operationId": "".join(part[:1].upper() + part[1:] for part in path.replace("{", "").replace("}", "").split("/")) + summary,
    }
    if body is not None:
        operation["requestBody"] = {"content": {JSON: {"schema": body}}, "required": True}
    operation["responses"] = {str(status): answer for status, answer in answers.items()}
    return operation


def _answer(what: str, schema: dict[str, Any], media_type: str = JSON) -> dict[str, Any]:
    return {"description": what, "content": {media_type: {"schema": schema}}}


def _errors(statuses: dict[int, str], error: dict[str, Any], retry: tuple[int, ...] = ()) -> dict[int, dict[str, Any]]:
    """The error answers: OpenAI's envelope; Retry-After (required) on the `retry` statuses."""
    answers = {status: _answer(what, error) for status, what in statuses.items()}
    for status in retry:
        answers[status]["headers"] = {"Retry-After": {
            "description": "seconds to wait", "required": True, "schema": {"type": "integer"}}}
    return answers


def _events(chunk: dict[str, Any], error: dict[str, Any]) -> dict[str, Any]:
    """A generation route's stream, as OpenAPI 3.1 reads a sequential media type: each event an
    object whose `data` is `[DONE]` or a JSON chunk (or, after a failure mid-stream, the envelope)."""
    return {
        "type": "object",
        "required": ["data"],
        "description": "`data: <chunk JSON>` events, then `data: [DONE]`",
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": JSON, "contentSchema": {"anyOf": [chunk, error]}},
        ]}},
    }
