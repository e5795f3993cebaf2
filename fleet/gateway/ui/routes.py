"""The status page's routes: the page and its two files, its event stream, and its actions.

- `GET /ui`: the page. Open: it holds no data; the data comes through the stream.
- `GET /ui/static/{file}`: its script and style sheet, from the package.
- `GET /ui/events`: the server-sent event stream (feed.py). With API keys configured it needs a
  key that may use every model, or the admin key (the page asks for one).
- `POST /ui/reload`, `POST /ui/engines/{engine}/restart|drain|resume`, `POST /ui/models/{model}/sleep|wake`: the actions. Only with the
  admin key (`[ui] admin_key` or $FLEET_ADMIN_KEY), from any address; none configured: the page
  is read-only and every action is refused (403). The key travels in `Authorization: Bearer`,
  which a browser never sends by itself to another site: no cross-site request can act.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from functools import cache
from typing import Any

import msgspec
from litestar import Request, Response, asgi, get, post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.types import Receive, Scope, Send

from fleet.errors import Forbidden, InvalidRequest
from fleet.gateway.auth import Keys, check_admin, check_host, is_admin
from fleet.gateway.control import control_of, model_action, reload_fleet
from fleet.gateway.ui.feed import stream
from fleet.wire.asgi import header, unless_disconnected

STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
_json = msgspec.json.Encoder()
NO_CACHE = {"cache-control": "no-cache"}
# The page shows what clients sent (prompts, with [ui] show_prompts; refused values in error messages):
# ui.js writes all of it as text, never as markup, and the browser is told to run nothing but the
# page's own files either way, to load nothing from elsewhere, and not to be framed by another site.
PAGE_HEADERS = {
    **NO_CACHE,
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]


@cache
def static_file(name: str) -> bytes:
    """One of the page's files, read from the package once."""
    return importlib.resources.files("fleet.gateway.ui").joinpath("static", name).read_bytes()


def check_viewer(keys: Keys, secret: bytes | None, authorization: str | None) -> None:
    """The stream: open without API keys; with them, a key that may use every model, or the admin key."""
    if not keys.enabled or is_admin(secret, authorization):
        return
    key = keys.check(authorization)
    if key is not None and key.models is not None:
        raise Forbidden("the status page shows every model: it needs a key that may use every model, or the admin key")


@get(["/ui", "/ui/"], sync_to_thread=False, include_in_schema=False)
def page(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The status page."""
    check_host(request.scope)
    return Response(static_file("index.html"), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@get("/ui/static/{name:str}", sync_to_thread=False, include_in_schema=False)
def static(name: FromPath[str]) -> Response[bytes]:
    """The page's script and style sheet."""
    if name not in STATIC:
        raise InvalidRequest(f"no such file: {name}")
    return Response(static_file(name), media_type=STATIC[name], headers={**NO_CACHE, "x-content-type-options": "nosniff"})


@asgi("/ui/events", is_mount=False, copy_scope=False)
async def events(scope: Scope, receive: Receive, send: Send) -> None:
    """The page's server-sent event stream (feed.py), until the page goes."""
    state: State = scope["app"].state
    check_host(scope)
    check_viewer(state.api_keys, state.ui_admin, header(scope, b"authorization"))
    control = control_of(state)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})

    async def write(body: bytes) -> None:
        await send({"type": "http.response.body", "body": body, "more_body": True})

    # it ends when the page goes (ClientDisconnected) or the connection breaks: nobody is left to answer
    with contextlib.suppress(Exception):
        await unless_disconnected(receive, stream(control, state.ui_history, state.recent, write,
                                                  can_act=state.ui_admin is not None, show_prompts=state.show_prompts))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _act(request: Request[Any, Any, Any]) -> Any:
    state: State = request.app.state
    check_admin(state.ui_admin, request.headers.get("authorization"))
    return control_of(state)


@post("/ui/reload", status_code=200)
async def reload_action(request: Request[Any, Any, Any]) -> Response[bytes]:
    """Re-read fleet.toml and apply the difference (as `fleet reload`)."""
    return Response(_json.encode(await reload_fleet(_act(request))), media_type="application/json")


@post("/ui/engines/{engine:str}/{action:str}", status_code=200, sync_to_thread=False)
def engine_action(request: Request[Any, Any, Any], engine: FromPath[str], action: FromPath[str]) -> Response[bytes]:
    """restart, drain or resume one engine (replica)."""
    control = _act(request)
    if action == "restart":
        control.restart(engine)
    elif action in ("drain", "resume"):
        control.drain(engine, action == "drain")
    else:
        raise InvalidRequest(f"no action {action!r}: restart, drain or resume", param="action")
    return Response(_json.encode({"engine": engine, "action": action}), media_type="application/json")


@post("/ui/models/{model:str}/{action:str}", status_code=200)
async def model_action_route(request: Request[Any, Any, Any], model: FromPath[str], action: FromPath[str]) -> Response[bytes]:
    """sleep or wake one model started on demand (as `fleet sleep` / `fleet wake`)."""
    return Response(_json.encode(await model_action(_act(request), model, action)), media_type="application/json")


ROUTES = [page, static, events, reload_action, engine_action, model_action_route]
