"""The routes of stored responses (/v1/responses' own are api/responses/): GET /v1/responses/{id},
DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items. Each reads only the caller's own
(its API key's): another key's response answers 404, as one that never was."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from litestar import HttpMethod, Request, Response, get, route
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery

from fleet.api.responses.protocol import DeletedResponse, InputItemList
from fleet.api.responses.store import ResponseStore, Stored
from fleet.errors import InvalidRequest, ResponseNotFound
from fleet.gateway.auth import require_key, scope_key

JSON = "application/json"
_json = msgspec.json.Encoder()


async def _stored(request: Request[Any, Any, Any], state: State, response_id: str) -> tuple[ResponseStore, Stored]:
    store: ResponseStore | None = state.responses
    key = scope_key(request.scope)
    found = await store.get(response_id, key.id if key else "") if store is not None else None
    if store is None or found is None:
        raise ResponseNotFound(response_id)
    return store, found


@route("/v1/responses/{response_id:str}", http_method=[HttpMethod.GET, HttpMethod.DELETE], status_code=200,
       before_request=require_key)
async def stored_response(request: Request[Any, Any, Any], state: State, response_id: FromPath[str]) -> Response[bytes]:
    """GET: a stored response, as it was answered. DELETE: forget it (a conversation can no longer
    continue from it). One handler for both methods, so that the path's Allow header names both."""
    store, found = await _stored(request, state, response_id)
    if request.method == HttpMethod.DELETE:
        await store.delete(found.id, found.owner)
        return Response(_json.encode(DeletedResponse(found.id)), media_type=JSON)
    return Response(found.response.encode(), media_type=JSON)


@get("/v1/responses/{response_id:str}/input_items", before_request=require_key)
async def list_input_items(request: Request[Any, Any, Any], state: State, response_id: FromPath[str],
                           limit: FromQuery[int] = 20, order: FromQuery[Literal["asc", "desc"]] = "desc",
                           after: FromQuery[str | None] = None) -> Response[bytes]:
    """The items a stored response was asked with (`limit` of them, from 1 to 100; `order` desc, the
    newest first, or asc; `after` an item's id, to page on)."""
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit is from 1 to 100", param="limit")
    _, found = await _stored(request, state, response_id)
    items = found.input_items if order == "asc" else found.input_items[::-1]
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(f"no input item {after!r} in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    listed = InputItemList(page, len(items) > limit, page[0].get("id") if page else None,
                           page[-1].get("id") if page else None)
    return Response(_json.encode(listed), media_type=JSON)


ROUTES = [stored_response, list_input_items]
