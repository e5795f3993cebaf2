"""fleet.toml's schema: the whole file (`FleetConfig`) and its fleet-wide tables (gateway, auth,
supervisor), their defaults and their one-field rules; a model's table is config/model.py.

Settings come from three layers, highest first: CLI flags (passed to `load.load_config` as
overrides), `FLEET_` environment variables (nested with `__`, e.g. `FLEET_GATEWAY__PORT=9000`),
then the TOML file (`FleetConfig.from_data`).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fleet.config.fields import Int, Strict, UserPath, user_path
from fleet.config.model import ModelConfig

DEFAULT_CONFIG = Path("fleet.toml")
DEFAULT_MAX_HEADER_BYTES = 64 << 10  # nginx's large_client_header_buffers (4 x 8k) and Envoy's 60 KiB, about
MAX_SHARED_FRACTION = 0.95  # of one GPU, summed over the models that share it
ENGINE_TOKEN_ENV = "FLEET_ENGINE_TOKEN"  # the token engines accept, which the gateway presents
ENGINE_SOCKET_ENV = "FLEET_ENGINE_SOCKET"  # a Unix socket an engine on the gateway's machine listens on too
PLACEMENT_GROUP_ENV = "FLEET_RAY_PLACEMENT_GROUP"  # a replica across a cluster's nodes: its placement group's id


class GatewayConfig(Strict):
    """Where the OpenAI-compatible gateway listens."""

    host: str = "127.0.0.1"
    port: Int = Field(8000, ge=1, le=65535)
    max_body_bytes: Int = Field(8 << 20, ge=1024, description="larger request bodies get 413")
    max_header_bytes: Int = Field(
        DEFAULT_MAX_HEADER_BYTES, ge=1024, description="a request's target and headers together; larger get 431"
    )
    engine_timeout: float = Field(
        300.0, gt=0, description="seconds an engine may stay silent during a request before it is a 504"
    )
    header_timeout: float = Field(
        5.0, gt=0, description="seconds a client has to send a request's headers, from its first byte (then 408)"
    )
    body_timeout: float = Field(5.0, gt=0, description="the longest pause between two reads of a request's body")
    max_connections: Int | None = Field(
        None, ge=1, description="client connections at once; default and ceiling: what the open-files limit allows"
    )
    max_connections_per_client: Int | None = Field(
        None, ge=1, description="connections from one client address; default: half of max_connections"
    )
    tls_certfile: UserPath | None = Field(None, description="PEM certificate (chain) to serve HTTPS with; with tls_keyfile")
    tls_keyfile: UserPath | None = Field(None, description="the certificate's unencrypted PEM private key; with tls_certfile")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="names clients reach the gateway by (their Host header) besides IP addresses and localhost: "
        "checked where the gateway has no API keys and listens on loopback, and on the control routes, so that a "
        "web page on another site cannot reach them by renaming itself to this machine (DNS rebinding)",
    )
    engine_token_file: UserPath | None = Field(
        None, description=f"a file whose first line is the token engines accept (${ENGINE_TOKEN_ENV} wins); "
        "needed for attached engines, the same file for `fleet engine`; default: a new random token per launch",
    )

    @field_validator("tls_certfile", "tls_keyfile", "engine_token_file")
    @classmethod
    def _tls_file_exists(cls, path: str | None) -> str | None:
        if path is None:
            return None
        if not (expanded := user_path(path)).is_file():
            raise ValueError(f"file not found: {path}")
        return str(expanded)  # uvicorn does not expand `~`

    @model_validator(mode="after")
    def _tls_both_or_neither(self) -> GatewayConfig:
        """Both TLS files or neither, and they load as a certificate and its key: a pair that does
        not would otherwise only fail inside uvicorn, after the engines started."""
        cert, key = self.tls_certfile, self.tls_keyfile
        if (cert is None) != (key is None):
            given, missing = ("tls_certfile", "tls_keyfile") if key is None else ("tls_keyfile", "tls_certfile")
            raise ValueError(f"{given} is set but {missing} is not: TLS needs both files, or neither")
        if cert is not None and key is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_passphrase)
            except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
                raise ValueError(f"tls_certfile {cert} with tls_keyfile {key}: not a certificate and its key: {e}") from None
        return self


def shared_engine_token(gateway: GatewayConfig, env: Mapping[str, str]) -> str | None:
    """The token the gateway and every engine share, when one is set: $FLEET_ENGINE_TOKEN, else
    the first line of [gateway] engine_token_file (ValueError: unreadable or empty). None: the
    launcher makes a random one, which only the engines it starts get."""
    if token := env.get(ENGINE_TOKEN_ENV, "").strip():
        return token
    if gateway.engine_token_file is None:
        return None
    try:
        token = Path(gateway.engine_token_file).read_text().partition("\n")[0].strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"[gateway] engine_token_file {gateway.engine_token_file}: cannot read it: {e}") from None
    if not token:
        raise ValueError(f"[gateway] engine_token_file {gateway.engine_token_file}: its first line is empty")
    return token


def _no_passphrase() -> str:
    """OpenSSL's password callback: never prompt on the terminal for an encrypted key."""
    raise ValueError("the key is encrypted; fleet needs an unencrypted tls_keyfile")


class ApiKey(Strict):
    """One API key, optionally limited to some models."""

    key: SecretStr = Field(min_length=1)
    models: list[str] | None = Field(None, description="the models this key may use; absent: all")


class AuthConfig(Strict):
    """API keys. With none configured the gateway is open: fleet refuses that on a non-loopback
    address unless `open` says it is meant (gateway.auth.check_exposure)."""

    keys: list[ApiKey] = Field(default_factory=list)
    keys_env: str | None = Field("FLEET_API_KEYS", description="an environment variable of comma-separated keys")
    keys_file: UserPath | None = Field(None, description="a file with one key per line, `key model1,model2` to limit it")
    open: bool = Field(
        False, description="serve a gateway that other machines can reach without keys, on purpose (refused otherwise)"
    )

    @field_validator("keys", mode="before")
    @classmethod
    def _plain_strings_are_keys(cls, value: object) -> object:
        if isinstance(value, list):
            return [{"key": v} if isinstance(v, str) else v for v in value]
        return value


class SupervisorConfig(Strict):
    """How the launcher watches, restarts and stops engines (seconds throughout)."""

    restart_backoff: float = Field(1.0, gt=0, description="wait before the first restart; doubles each time")
    restart_backoff_max: float = Field(60.0, gt=0, description="the longest wait between restarts")
    max_restarts: int = Field(5, ge=0, description="restarts in a row before the model stays failed")
    restart_reset_after: float = Field(300.0, gt=0, description="ready this long: the restart count starts over")
    health_interval: float = Field(2.0, gt=0, description="how often a ready engine's /health is polled")
    health_failures: int = Field(3, ge=1, description="failed polls in a row that count as a crash")
    stop_grace: float = Field(15.0, gt=0, description="SIGTERM, then SIGKILL after this long")
    drain_timeout: float = Field(30.0, gt=0, description="how long in-flight requests may finish at shutdown/reload")


class UiConfig(Strict):
    """The status page at the gateway's /ui (docs/operations.md): who may act on it, what it shows."""

    enabled: bool = Field(True, description="serve the status page at /ui")
    admin_key: SecretStr | None = Field(
        None, min_length=1, description="the key the page's actions (reload, restart, drain) need; none: read-only")
    admin_key_env: str | None = Field(
        "FLEET_ADMIN_KEY", description="an environment variable holding the admin key (wins over admin_key)")
    show_prompts: bool = Field(
        False, description="show the start of each prompt in the page's recent requests (off: no prompt text)")

    def admin_secret(self, env: Mapping[str, str]) -> bytes | None:
        """The admin key in effect: $admin_key_env's value, else admin_key; None: the page is read-only."""
        if self.admin_key_env and (value := env.get(self.admin_key_env, "").strip()):
            return value.encode()
        return self.admin_key.get_secret_value().encode() if self.admin_key else None


class ClusterConfig(Strict):
    """Engines on a cluster instead of this machine (docs/cluster.md): each replica a Ray actor that
    runs its engine on a node Ray picks. Absent: local processes, and Ray is never imported."""

    system: Literal["ray"] = Field(
        "ray", validation_alias=AliasChoices("system", "backend"),  # `backend`, its first name, still read
        description="the cluster system; Ray is the one there is",
    )
    address: str = Field(
        "auto", min_length=1,
        description='the Ray cluster: "auto" (the one `ray start` runs on this machine), HOST:PORT of its head, or ray://HOST:10001',
    )
    namespace: str = Field("fleet", min_length=1, description="the Ray namespace of the fleet's actors")
    engine_cpus: float = Field(1.0, gt=0, description="CPUs each engine asks of its node (beside its GPUs)")


class ResponsesConfig(Strict):
    """The Responses API's stored responses (`store`, `previous_response_id`): kept in an embedded
    SQLite database, bounded by age and count."""

    store_path: UserPath | None = Field(
        None, description="the SQLite file that keeps stored responses; default: <cache>/responses.sqlite3")
    max_age_days: float = Field(30.0, gt=0, description="stored responses older than this are dropped")
    max_stored: Int = Field(10_000, ge=1, description="at most this many are kept (the oldest go first; checked "
                            "every 64 stores)")


class SwapSetConfig(Strict):
    """Models that share GPUs (or this machine's memory) beyond what fits at once ([[sets]]): only as
    many of them run at once as fit, the others asleep or stopped; a request for one that is not
    awake waits while room is made for it (fleet/run/swap.py; which one goes: run/swap_policy.py)."""

    name: str = Field(min_length=1, description="the set's name, in fleet check, the status page and metrics")
    models: list[str] = Field(min_length=2, description="its members: models of this file, each in one set at most")
    awake: Int | None = Field(
        None, ge=1, description="at most this many members awake at once; default: as many as fit their GPUs "
        "by gpu_memory_utilization where every member gives it, else 1",
    )
    min_awake: float = Field(
        10.0, ge=0, description="seconds a member just started or woken keeps its place before it may be put away "
        "for another (no thrashing); a request meanwhile waits",
    )


_TOML_DATA: ContextVar[Mapping[str, Any]] = ContextVar("fleet_toml_data", default=MappingProxyType({}))


class _TomlDataSource(PydanticBaseSettingsSource):
    """The already-parsed fleet file, as the lowest-priority settings source."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return _TOML_DATA.get().get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_TOML_DATA.get())


class FleetConfig(BaseSettings):
    """A whole fleet: the gateway and its models."""

    model_config = SettingsConfigDict(
        env_prefix="FLEET_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    cluster: ClusterConfig | None = Field(None, description="engines on a Ray cluster (absent: on this machine)")
    ui: UiConfig = Field(default_factory=UiConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    sets: list[SwapSetConfig] = Field(
        default_factory=list, description="models that share GPUs beyond what fits at once: only as many awake as fit",
    )
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _members_know_their_set(cls, data: Any) -> Any:
        """Each model named in a [[sets]] entry carries the set's name (`swap_set`): it is then started
        on demand, and may sleep (check_sets holds the rules across the two tables)."""
        if not isinstance(data, dict) or not isinstance(data.get("sets"), list) or not isinstance(data.get("models"), list):
            return data
        member_of: dict[str, str] = {}
        for entry in data["sets"]:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("models"), list):
                for name in entry["models"]:
                    if isinstance(name, str):
                        member_of.setdefault(name, entry["name"])
        models = [{**m, "swap_set": member_of[m["name"]]}
                  if isinstance(m, dict) and isinstance(m.get("name"), str) and m["name"] in member_of else m
                  for m in data["models"]]
        return {**data, "models": models}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: CLI flags (init kwargs), FLEET_ environment, the TOML file.
        return (init_settings, env_settings, _TomlDataSource(settings_cls))

    @classmethod
    def from_data(cls, raw: dict[str, Any], **init: Any) -> FleetConfig:
        """Validate an already-parsed fleet file under `init` (CLI flags) and FLEET_ variables;
        raises pydantic's ValidationError."""
        token = _TOML_DATA.set(raw)
        try:
            return cls(**init)
        finally:
            _TOML_DATA.reset(token)

    def model(self, name: str) -> ModelConfig | None:
        """The model clients call `name`, if any."""
        return next((m for m in self.models if m.name == name), None)

    def swap_set(self, name: str) -> SwapSetConfig | None:
        """The [[sets]] entry called `name`, if any."""
        return next((s for s in self.sets if s.name == name), None)
