"""Every kind of failure fleet reports, as a type.

A request error is a `FleetError`: its HTTP status, OpenAI's `type` and `code`, the `param` it
names and any extra headers are arguments of the one base; each subclass only fixes them. The
gateway turns them into OpenAI's envelope in one exception handler (gateway/app.py), and a
stream that already started reports them with the same envelope (api/answers.py).

May import: nothing of fleet (the ground floor).
"""

from __future__ import annotations

CLIENT_CLOSED = 499  # nginx's code for "client closed the request", as a metrics label
MAX_MESSAGE = 2048  # characters of an error message; what a client sent is never echoed unbounded
SHOWN = 64  # characters of one client-sent value an error message quotes


def shown(value: str, limit: int = SHOWN) -> str:
    """A client-sent value as an error message quotes it: repr'd, and cut to `limit` characters
    with its length said (a 10,000-character model name is not echoed whole)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value):,} characters)"


def listed(items: list[int], limit: int = 5) -> str:
    """A few of `items`, then how many more: "100000, 100001 and 99,998 more"."""
    head = ", ".join(map(str, items[:limit]))
    return head if len(items) <= limit else f"{head} and {len(items) - limit:,} more"


def bounded(message: str, limit: int = MAX_MESSAGE) -> str:
    """A message cut to `limit` characters, saying so."""
    return message if len(message) <= limit else f"{message[:limit]}... ({len(message):,} characters in all)"


class ConfigError(Exception):
    """A fleet file that cannot be run; the message names the file, the model and the field."""


class InvalidTransition(RuntimeError):
    """A lifecycle change its table does not allow: a bug in the launcher, never user input."""


class FleetError(Exception):
    """A request fleet cannot serve, with everything its HTTP answer needs."""

    def __init__(self, message: str, *, status: int = 500, type: str = "server_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message = bounded(message)
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)


class InvalidRequest(FleetError):
    """The request breaks a rule of the API (HTTP 400)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, status=400, type="invalid_request_error", param=param, code=code)


class BodyTooLarge(FleetError):
    """A request body over the gateway's max_body_bytes (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the gateway's max_body_bytes ({limit} bytes)",
                         status=413, type="invalid_request_error")


class Unauthorized(FleetError):
    """No key, or a key fleet does not know (HTTP 401)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=401, type="invalid_request_error", code="invalid_api_key",
                         headers={"WWW-Authenticate": "Bearer"})


class Forbidden(FleetError):
    """A known client that may not do this: a key limited to other models, or a control request
    from another machine (HTTP 403)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, status=403, type="permission_error", param=param, code=code)


class ModelNotFound(FleetError):
    """No model of the fleet has that name (HTTP 404)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=404, type="invalid_request_error", param="model", code="model_not_found")


class ResponseNotFound(FleetError):
    """No stored response has that id for this API key (HTTP 404): never stored, forgotten by the
    store's bounds, deleted, or another key's."""

    def __init__(self, response_id: str, param: str | None = None) -> None:
        super().__init__(f"no stored response {shown(response_id)}", status=404, type="invalid_request_error",
                         param=param, code="response_not_found")


class EngineNotFound(FleetError):
    """No engine (replica) of the fleet has that name: a status page action (HTTP 404)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"no engine named {shown(name)} in the fleet", status=404, type="invalid_request_error",
                         param="engine", code="engine_not_found")


class TooManyRequests(FleetError):
    """The model's queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, status=429, type="rate_limit_error", code="rate_limit_exceeded",
                         retry_after=retry_after)


class ClientDisconnected(FleetError):
    """The client left before the answer was ready (never sent: there is no one to send it to)."""

    def __init__(self, message: str = "the client closed the connection") -> None:
        super().__init__(message, status=CLIENT_CLOSED, type="client_closed_request")


class EngineFailure(FleetError):
    """The engine broke while holding the request (HTTP 502)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=502, code="engine_error")


class EngineUnreachable(EngineFailure):
    """The engine never began the request: no connection could be opened, or the connection ended
    before the first byte of its answer (an engine sends its response head before it starts any
    work: fleet/engine/server.py). Another replica may take it; the only failure after which a
    POST is ever sent again, and to each replica at most once."""


class EngineLost(EngineFailure):
    """The engine died while answering: its connection broke (or its vLLM core died) after the
    answer began. Another replica may take the request over (gateway/routing/resume.py)."""


class RequestGivenUp(EngineFailure):
    """A request whose engines died under it and that fleet does not send on: no replica left to
    take it, a stream that cannot be continued exactly, or one that killed two engines (HTTP 502,
    its message says which)."""


class ModelNotReady(FleetError):
    """The model's engine is loading, restarting or failed (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, status=503, type="service_unavailable", param="model", code="model_not_ready",
                         retry_after=retry_after)


class StoreUnavailable(FleetError):
    """The gateway's store of responses cannot be read (its file's disk failed, was removed, is
    locked by another process past the wait): HTTP 503, the store's own words in the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, type="service_unavailable", code="store_unavailable", retry_after=5)


class EngineTimeout(FleetError):
    """The engine stopped answering in the middle of a request (HTTP 504)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=504, code="engine_timeout")
