"""The running fleet's control routes, used by `fleet status / reload / stop / sleep / wake`.

`GET /fleet/status`, `POST /fleet/reload`, `POST /fleet/stop`, `POST /fleet/models/{model}/sleep|wake`.
They answer only clients on the gateway's own machine (loopback addresses); anyone else gets 403.
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (vLLM's shapes) answer any address that
brings the admin key, as the status page's actions do.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, Protocol

import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State
from litestar.params import FromPath

from fleet.config.schema import FleetConfig
from fleet.errors import ConfigError, Forbidden, InvalidRequest, shown
from fleet.gateway.auth import check_admin, check_host, require_admin
from fleet.gateway.status import Change, FleetStatus, LoadAdapter, LogLine, ReloadReport, UnloadAdapter

_json = msgspec.json.Encoder()


class JournalView(Protocol):
    """The engines' recent lines and state changes, numbered fleet-wide (fleet.run.journal.Journal)."""

    @property
    def seq(self) -> int: ...
    def lines_after(self, seq: int) -> list[LogLine]: ...
    def changes_after(self, seq: int) -> list[Change]: ...
    async def wait(self, after: int) -> None: ...


class Control(Protocol):
    """What the control routes and the status page need from the launcher's Fleet."""

    def status(self) -> FleetStatus: ...
    async def reload(self) -> ReloadReport: ...
    def stop(self) -> None: ...

    @property
    def config(self) -> FleetConfig: ...  # the configuration in effect (a reload replaces it)

    @property
    def journal(self) -> JournalView: ...

    @property
    def stopping(self) -> asyncio.Event: ...  # set once the fleet stops: open streams end, so the gateway can

    def restart(self, engine: str) -> None:
        """Restart one engine (replica) now: EngineNotFound, or InvalidRequest for an attached one."""
        ...

    def drain(self, engine: str, draining: bool) -> None:
        """Stop (or resume) routing new requests to one engine; those in flight go on."""
        ...

    async def sleep(self, model: str) -> str:
        """Put a model started on demand away now (drained, then asleep on GPUs or stopped); its
        state once away. ModelNotFound, or InvalidRequest for a model that runs from launch to stop."""
        ...

    async def wake(self, model: str) -> str:
        """Wake (or start) a model started on demand, as its next request would; its state then."""
        ...

    async def load_adapter(self, name: str, path: str, model: str | None) -> str:
        """Add a LoRA adapter to a model serving LoRA (its engines load it now); the model's name.
        InvalidRequest (400) naming the field for what cannot be loaded."""
        ...

    async def unload_adapter(self, name: str, model: str | None) -> str:
        """Remove an adapter: new requests naming it get a 404; the model's name."""
        ...


def check_local(request: Request[Any, Any, Any]) -> None:
    """Control routes answer loopback clients only, that name the gateway by an IP address,
    localhost or a name of [gateway] allowed_hosts (auth.check_host: not a web page's rebinding)."""
    check_host(request.scope, always=True)
    host = request.client.host if request.client else ""
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise Forbidden("fleet control routes answer only clients on the gateway's machine")


def control_of(state: State) -> Control:
    control: Control | None = state.get("control")
    if control is None:
        raise InvalidRequest("this gateway runs without a launcher: no fleet control")
    return control


async def reload_fleet(control: Control) -> ReloadReport:
    """Re-read fleet.toml and apply the difference; a file that is refused changes nothing (400)."""
    try:
        return await control.reload()
    except ConfigError as e:
        raise InvalidRequest(f"reload refused, nothing changed: {e}") from None


@get("/fleet/status", sync_to_thread=False, before_request=require_admin)
def fleet_status(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Every model's state, pid, uptime, restarts, requests in flight and token rate."""
    check_local(request)
    return Response(_json.encode(control_of(state).status()), media_type="application/json")


@post("/fleet/reload", status_code=200, before_request=require_admin)
async def fleet_reload(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Re-read fleet.toml and apply the difference."""
    check_local(request)
    return Response(_json.encode(await reload_fleet(control_of(state))), media_type="application/json")


@post("/fleet/stop", status_code=202, sync_to_thread=False, before_request=require_admin)
def fleet_stop(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """Stop the fleet (as SIGTERM does)."""
    check_local(request)
    control_of(state).stop()
    return Response(b'{"stopping": true}', media_type="application/json", status_code=202)


@post("/fleet/models/{model:str}/{action:str}", status_code=200, before_request=require_admin)
async def fleet_model_action(request: Request[Any, Any, Any], state: State, model: FromPath[str],
                             action: FromPath[str]) -> Response[bytes]:
    """`fleet sleep MODEL` and `fleet wake MODEL`: put a model started on demand away now, or bring it up."""
    check_local(request)
    return Response(_json.encode(await model_action(control_of(state), model, action)), media_type="application/json")


async def model_action(control: Control, model: str, action: str) -> dict[str, str]:
    """sleep or wake one model (the control route's and the status page's); its state after."""
    if action == "sleep":
        now = await control.sleep(model)
    elif action == "wake":
        now = await control.wake(model)
    else:
        raise InvalidRequest(f"no action {shown(action)}: sleep or wake", param="action")
    return {"model": model, "action": action, "state": now}


@post("/v1/load_lora_adapter", status_code=200)
async def load_lora_adapter(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """vLLM's route to add a LoRA adapter at run time, behind the admin key ([ui] admin_key)."""
    check_admin(state.admin_key, request.headers.get("authorization"))
    body = _decode(await request.body(), LoadAdapter)
    base = await control_of(state).load_adapter(body.lora_name, body.lora_path, body.model)
    return Response(_json.encode({"model": body.lora_name, "parent": base, "loaded": True}), media_type="application/json")


@post("/v1/unload_lora_adapter", status_code=200)
async def unload_lora_adapter(request: Request[Any, Any, Any], state: State) -> Response[bytes]:
    """vLLM's route to remove a LoRA adapter, behind the admin key."""
    check_admin(state.admin_key, request.headers.get("authorization"))
    body = _decode(await request.body(), UnloadAdapter)
    base = await control_of(state).unload_adapter(body.lora_name, body.model)
    return Response(_json.encode({"model": body.lora_name, "parent": base, "loaded": False}), media_type="application/json")


def _decode(body: bytes, kind: type[LoadAdapter] | type[UnloadAdapter]) -> Any:
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as e:
        raise InvalidRequest(f"invalid body: {e}") from None


ROUTES = [fleet_status, fleet_reload, fleet_stop, fleet_model_action, load_lora_adapter, unload_lora_adapter]
