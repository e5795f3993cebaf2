"""Every kind of failure fleet reports, as a type carrying its HTTP status.

The gateway maps these to OpenAI's error envelope in one exception handler (app.py);
nothing else in the code builds error bodies.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A fleet file that cannot be run; the message names the file, the model and the field."""


class FleetError(Exception):
    """A request fleet cannot serve; `status`, `type` and `code` follow OpenAI's conventions."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        """Extra response headers (Retry-After, for instance)."""
        return {}


class InvalidRequest(FleetError):
    """The request breaks a rule of the API (HTTP 400)."""

    status = 400
    type = "invalid_request_error"


class ModelNotFound(FleetError):
    """No model of the fleet has that name (HTTP 404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class ModelNotReady(FleetError):
    """The model's engine is loading, restarting or failed (HTTP 503 with Retry-After)."""

    status = 503
    type = "service_unavailable"
    code = "model_not_ready"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message, param="model")
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class EngineFailure(FleetError):
    """The engine broke while holding the request (HTTP 502)."""

    status = 502
    type = "server_error"
    code = "engine_error"


class EngineTimeout(FleetError):
    """The engine stopped answering in the middle of a request (HTTP 504)."""

    status = 504
    type = "server_error"
    code = "engine_timeout"


class BodyTooLarge(FleetError):
    """A request body over the gateway's max_body_bytes (HTTP 413)."""

    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the gateway's max_body_bytes ({limit} bytes)")

