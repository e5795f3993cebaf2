"""The gateway's OpenAPI document: what Litestar infers from the routes, plus what it cannot.

- The generation routes are ASGI handlers (app.py says why), which Litestar does not document.
  Their entries come from typed twins below: handlers with the same path, body and answers that
  are never served, registered in a throwaway app when the document is first asked for.
- Both generation routes answer JSON or, with `stream: true`, server-sent events.
- 429 and 503 carry Retry-After, which the openai SDK honours.

The document is built on its first request, not at start (~0.1 s of the gateway's start).
"""

from __future__ import annotations

import msgspec
from litestar import post
from litestar._openapi.plugin import OpenAPIPlugin  # not exported; the fuzz tests read what it builds
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPI, Reference
from litestar.params import JSONBody
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp

from fleet.api.chat.protocol import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from fleet.api.completions.protocol import CompletionChunk, CompletionRequest, CompletionResponse
from fleet.api.protocol import ErrorResponse

JSON = "application/json"
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
STREAMS = {"/v1/completions": CompletionChunk, "/v1/chat/completions": ChatCompletionChunk}


def ok(kind: type, what: str, media_type: str = JSON) -> dict[int, ResponseSpec]:
    """The documented 200 of a handler that returns pre-encoded bytes (Litestar would say "string")."""
    return {200: ResponseSpec(kind, description=what, generate_examples=False, media_type=media_type)}


@post("/v1/completions", status_code=200, responses={
    **ERROR_RESPONSES, **ok(CompletionResponse, "the completion; with stream: true, server-sent events")})
async def completions_route(data: JSONBody[CompletionRequest]) -> ASGIApp:
    """OpenAI's legacy completions: parse, route, plan, run."""
    raise NotImplementedError("documentation only: app.py serves this route")


@post("/v1/chat/completions", status_code=200, responses={
    **ERROR_RESPONSES, **ok(ChatCompletionResponse, "the chat completion; with stream: true, server-sent events")})
async def chat_completions(data: JSONBody[ChatCompletionRequest]) -> ASGIApp:
    """OpenAI's chat completions: the engine renders the messages with the model's chat template."""
    raise NotImplementedError("documentation only: app.py serves this route")


DOCUMENTED = [completions_route, chat_completions]


class GatewayOpenAPI(OpenAPIPlugin):
    """Litestar's OpenAPI plugin, plus the generation routes' twins and their stream answers."""

    __slots__ = ()

    def provide_openapi(self) -> OpenAPI:
        """The document, built once on first use."""
        if self._openapi is None:
            twins = type(self.app)(route_handlers=DOCUMENTED, openapi_config=None, logging_config=None)
            documented = {r.path: r for r in twins.routes if isinstance(r, HTTPRoute)}
            served = self.included_routes
            self.included_routes = {  # in the order the app routes them
                r.path: served.get(r.path) or documented[r.path]
                for r in self.app.routes if r.path in served or r.path in documented
            }
            _document_streams(super().provide_openapi())
        return super().provide_openapi()


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
        answer = responses.get("200")
        if answer is not None and not isinstance(answer, Reference) and answer.content is not None:
            answer.content["text/event-stream"] = OpenAPIMediaType(schema={  # type: ignore[arg-type]
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
