"""API keys for the gateway: from fleet.toml, an environment variable, or a file; never logged.

A key either opens every model or only the models listed for it. `Authorization: Bearer <key>`
is compared with every configured key in constant time (`hmac.compare_digest`), so timing does
not tell how much of a guess was right. With no key configured, the gateway is open, which
`check_exposure` allows only on loopback or when `[auth] open = true` says so.

Such an open loopback gateway is still reachable from a web page in a browser on this machine,
through DNS rebinding: a site whose name is made to resolve to 127.0.0.1 sends same-origin
requests that name it, not this machine, in their Host header. `check_host` refuses those (as
llama.cpp's and Ollama's servers came to): where the gateway has no keys and listens on loopback,
and always on the control routes, which take no key, a request must name the gateway by an IP
address, `localhost`, or a name of `[gateway] allowed_hosts`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the `fleet` command reads keys from here without loading Litestar
    from litestar import Request
    from litestar.types import Scope

from fleet.config.schema import AuthConfig
from fleet.errors import ConfigError, Forbidden, Unauthorized, shown
from fleet.wire.asgi import header
from fleet.wire.client import is_loopback


@dataclass(frozen=True)
class Key:
    """One API key and the models it may use (None: all)."""

    secret: bytes
    models: frozenset[str] | None

    def __repr__(self) -> str:  # never print the secret
        return f"Key(models={sorted(self.models) if self.models else 'all'})"

    @property
    def id(self) -> str:
        """A stable name for the key that does not reveal it (what owns a stored response)."""
        return hashlib.sha256(b"fleet key " + self.secret).hexdigest()[:32]


class Keys:
    """The gateway's keys; `check` returns the caller's key or raises Unauthorized."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

    @property
    def enabled(self) -> bool:
        """Whether requests need a key at all."""
        return bool(self.keys)

    def check(self, authorization: str | None) -> Key | None:
        """The key presented in an Authorization header (constant time), or Unauthorized."""
        if not self.keys:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        presented = token.strip().encode()
        found = None
        for key in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(presented, key.secret):
                found = key
        if found is None:
            raise Unauthorized("invalid API key")
        return found

    @staticmethod
    def allow(key: Key | None, model: str) -> None:
        """Raise Forbidden when the key is limited to other models."""
        if key is not None and key.models is not None and model not in key.models:
            raise Forbidden(f"this API key may not use model {shown(model)}", param="model", code="model_not_allowed")


def load_keys(cfg: AuthConfig) -> Keys:
    """Keys from fleet.toml's [auth] table, its environment variable and its file."""
    keys = [Key(k.key.get_secret_value().encode(), frozenset(k.models) if k.models is not None else None)
            for k in cfg.keys]
    if cfg.keys_env and (value := os.environ.get(cfg.keys_env)):
        keys += [_parse_line(part, f"${cfg.keys_env}") for part in value.split(",") if part.strip()]
    if cfg.keys_file:
        path = Path(cfg.keys_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"[auth] keys_file {path}: {e.strerror}") from None
        keys += [_parse_line(line, str(path)) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return Keys(keys)


def check_exposure(host: str, keys_enabled: bool, open: bool) -> str | None:
    """A gateway other machines can reach needs keys, or `[auth] open = true` said on purpose
    (`vllm serve` listens openly by default; fleet does not).

    None on a loopback `host` (127.0.0.0/8, ::1, "localhost") or with keys; a non-loopback one
    (the wildcards "0.0.0.0", "::" and "" included) without keys raises ConfigError naming the
    address and both ways out, unless `open`: then the answer is the warning line to print."""
    if keys_enabled or is_loopback(host):
        return None
    if open:
        return (f'the gateway on "{host}" is open to the network without API keys ([auth] open = true): '
                "anyone who can reach it may use every model")
    raise ConfigError(
        f'the gateway would listen on "{host}", an address other machines can reach, with no API key '
        "configured: anyone could use every model. Either configure keys ([auth] keys or keys_file, or the "
        "environment variable [auth] keys_env names, FLEET_API_KEYS by default), or set [auth] open = true "
        "to serve it open on purpose (or listen on 127.0.0.1)")


def _parse_line(line: str, where: str) -> Key:
    """`key` or `key model1,model2` (a key limited to those models)."""
    secret, _, models = line.strip().partition(" ")
    if not secret:
        raise ConfigError(f"{where}: an empty API key")
    limited = frozenset(m.strip() for m in models.split(",") if m.strip()) if models.strip() else None
    return Key(secret.encode(), limited)


def host_trusted(host: str | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names this gateway as only its own clients would: an IP address,
    localhost (or a name under .localhost), or one of `allowed`. No Host at all (HTTP/1.0, never a
    browser) passes."""
    if not host:
        return True
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host  # "name:port", or IPv6 without a port
    name = name.removeprefix("[").split("]")[0].lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost") or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def check_host(scope: Scope, always: bool = False) -> None:
    """A request's Host header, where the gateway checks it (state `trusted_hosts`: the gateway has
    no keys and listens on loopback), or `always` (the control routes); else a 403."""
    state = scope["app"].state
    allowed: frozenset[str] | None = state.get("trusted_hosts")
    if allowed is None:
        if not always:
            return
        allowed = state.get("allowed_hosts") or frozenset()
    host = header(scope, b"host")
    if not host_trusted(host, allowed):
        raise Forbidden(f"this gateway answers requests that name it by an IP address, localhost or a name of "
                        f"[gateway] allowed_hosts; this one names {shown(host or '')} (as a web page on another "
                        "site does that made its name resolve to this machine)", code="host_not_allowed")


async def require_key(request: Request[Any, Any, Any]) -> None:
    """Litestar before_request hook: a valid API key when the fleet has keys (kept for model checks).

    A hook rather than a guard: Litestar copies the route handler for every guard call, a cost on
    every request; the hook still runs before the body is read, so a request without a valid key
    is a 401 whatever its body.
    """
    check_host(request.scope)
    keys: Keys = request.app.state.api_keys
    if keys.enabled:
        request.scope["fleet_key"] = keys.check(request.headers.get("authorization"))  # type: ignore[typeddict-unknown-key]  # litestar's Scope TypedDict is closed; ASGI scopes take extra keys


def scope_key(scope: Scope) -> Key | None:
    """The caller's key as require_key kept it in the scope (None: the fleet has no keys)."""
    key = scope.get("fleet_key")
    return key if isinstance(key, Key) else None


async def require_admin(request: Request[Any, Any, Any]) -> None:
    """Litestar before_request hook for control routes: with keys, a key that may use every model."""
    await require_key(request)
    key = scope_key(request.scope)
    if key is not None and key.models is not None:
        raise Forbidden("fleet control needs a key that may use every model", code="model_not_allowed")


def bearer(authorization: str | None) -> bytes | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" and token.strip() else None


def is_admin(secret: bytes | None, authorization: str | None) -> bool:
    """Whether the Authorization header holds the admin key (constant time)."""
    presented = bearer(authorization)
    return secret is not None and presented is not None and hmac.compare_digest(presented, secret)


def check_admin(secret: bytes | None, authorization: str | None) -> None:
    """Actions: the admin key, or 403 (none configured) / 401 (missing or wrong)."""
    if secret is None:
        raise Forbidden("read-only: the status page's actions and adapter loading need an admin key ([ui] admin_key, or "
                        "the environment variable [ui] admin_key_env names, FLEET_ADMIN_KEY by default)")
    if bearer(authorization) is None:
        raise Unauthorized("missing admin key: send Authorization: Bearer <admin key>")
    if not is_admin(secret, authorization):
        raise Unauthorized("invalid admin key")
