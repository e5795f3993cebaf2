"""The configuration in effect, written back as TOML for people to read (the status page), with
every secret masked: API keys, the admin key."""

from __future__ import annotations

from typing import Any

import tomli_w

from fleet.config.schema import FleetConfig

MASK = "********"


def effective_toml(config: FleetConfig) -> str:
    """`config` as a fleet.toml: what differs from the defaults, secrets as MASK. pydantic writes a
    `SecretStr` as asterisks in JSON mode; TOML has no null, so unset fields are left out."""
    data: dict[str, Any] = config.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
    return tomli_w.dumps(_masked(data))


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: MASK if k in ("key", "admin_key") and isinstance(v, str) else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value
