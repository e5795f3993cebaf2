"""The running fleet's control routes, used by `fleet status / reload / stop`.

`GET /fleet/status`, `POST /fleet/reload`, `POST /fleet/stop`. They answer only clients on
the gateway's own machine (loopback addresses); anyone else gets 403.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State

from fleet.errors import ConfigError, Forbidden, InvalidRequest
from fleet.gateway.auth import require_admin
from fleet.gateway.status import FleetStatus, ReloadReport

_json = msgspec.json.Encoder()


class Control(Protocol):
    """What the control routes need from the launcher's Fleet."""

    def status(self) -> FleetStatus: ...
    async def reload(self) -> ReloadReport: ...
    def stop(self) -> None: ...


def check_local(request: Request[Any, Any, Any]) -> None:
    """Control routes answer loopback clients only."""
    host = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise Forbidden("fleet control routes answer only clients on the gateway's machine")


def _control(state: State) -> Control:
    control: Control | None = state.get("control")
    if control is None:
        raise InvalidRequest("this gateway runs without a launcher: no fleet control")
    return control


@get("/fleet/status", sync_to_thread=False, before_request=require_admin)
def fleet_status(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Every model's state, pid, uptime, restarts, requests in flight and token rate."""
    check_local(request)
    return Response(_json.encode(_control(state).status()), media_type="application/json")


@post("/fleet/reload", status_code=200, before_request=require_admin)
async def fleet_reload(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Re-read fleet.toml and apply the difference."""
    check_local(request)
    try:
        report = await _control(state).reload()
    except ConfigError as e:
        raise InvalidRequest(f"reload refused, nothing changed: {e}") from None
    return Response(_json.encode(report), media_type="application/json")


@post("/fleet/stop", status_code=202, sync_to_thread=False, before_request=require_admin)
def fleet_stop(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Stop the fleet (as SIGTERM does)."""
    check_local(request)
    _control(state).stop()
    return Response(b'{"stopping": true}', media_type="application/json", status_code=202)


ROUTES = [fleet_status, fleet_reload, fleet_stop]
