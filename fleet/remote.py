"""A running fleet, reached through its gateway's control routes (`/fleet/*`): `Remote`, the
client that `fleet status`, `fleet reload` and `fleet stop` use. It finds the gateway from the
fleet file (or the flags that override it), trusts only the gateway's own certificate when it
serves TLS, and presents the admin key the control routes need when the fleet has API keys.

A fleet file that cannot say how to reach it (an unreadable certificate, keys file) is a
`ConfigError`; a fleet that does not answer, or refuses, a `RemoteError`; each message says what
went wrong, and the command line prints it.

May import: fleet.gateway.auth, fleet.wire.client, fleet.config, fleet.errors.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field

from fleet.config.schema import FleetConfig
from fleet.errors import ConfigError

API_KEY_ENV = "FLEET_API_KEY"  # the key the control routes get, when the fleet has keys


class RemoteError(Exception):
    """A running fleet could not be reached or refused what was asked (the message says which)."""


@dataclass(frozen=True)
class Remote:
    """One running fleet's gateway: where it listens, how to trust it, what key to present."""

    url: str
    verify: ssl.SSLContext | bool = True
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: FleetConfig, env: Mapping[str, str] = os.environ) -> Remote:
        """The gateway of the fleet `config` describes (its [gateway] host and port: already with
        any flags applied): https trusting only its own certificate when it serves TLS; the key from
        $FLEET_API_KEY, else the first of the file's own keys that may use every model."""
        from fleet.wire.client import connect_host, pinned_tls_context, url_of

        gw = config.gateway
        verify: ssl.SSLContext | bool
        if gw.tls_certfile is None:
            url, verify = url_of(gw.host, gw.port), True
        else:
            try:
                url = url_of(gw.host, gw.port, tls=True)
                verify = pinned_tls_context(gw.tls_certfile, connect_host(gw.host))
            except ssl.SSLError as e:
                raise ConfigError(f"[gateway] tls_certfile {gw.tls_certfile}: {e}") from None
        key = env.get(API_KEY_ENV)
        if not key:
            from fleet.gateway.auth import load_keys

            keys = load_keys(config.auth).keys
            key = next((k.secret.decode() for k in keys if k.models is None), None)
        return cls(url, verify, {"Authorization": f"Bearer {key}"} if key else {})

    def call(self, method: str, path: str, *, timeout: float = 120) -> bytes:
        """One control request; its body, or RemoteError with the gateway's own message."""
        import httpx

        url = self.url + path
        try:
            r = httpx.request(method, url, timeout=timeout, verify=self.verify, headers=self.headers)
        except httpx.HTTPError as e:
            raise RemoteError(f"no fleet answers at {url}: {e}") from None
        if r.status_code >= 400:
            try:
                body = r.json()
                message = body.get("error", {}).get("message", body) if isinstance(body, dict) else body
            except ValueError:
                message = r.text
            raise RemoteError(str(message))
        return r.content
