"""Settings of the service, read from the environment (pydantic-settings).

Every name is the environment variable upper-cased (`redis_port` is `REDIS_PORT`). The
table is in the README; defaults of the limits come from docs/protocol.md, "Default limits".
Durations are whole seconds (`*_s`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mqtt_pairing.errors import ConfigError
from mqtt_pairing.tombstones import TombstoneLayout
from mqtt_pairing.topics import is_valid_id

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32
"""docs/protocol.md: `PAIRING_SECRET` is at least 32 bytes."""

SHARED_GROUP_LABEL = b"mqtt-pairing shared subscription group v1"
"""What `derive_shared_group` MACs with `PAIRING_SECRET`; changing it moves every group."""

LEGACY_SHARED_GROUP = "mqtt-pairing"
"""The public default group of earlier versions, which any runner or app could join."""

_MIN_SAFE_GROUP_CHARS = 16

_REDIS_HOST_GROUP = frozenset({"redis_host", "redis_port", "redis_db"})
"""Settings that only matter without `REDIS_URL` / `REDIS_CLUSTER_URL`."""


def _default_client_id() -> str:
    # The `:` keeps it outside the runner/app id pattern (docs/security.md, "Client ids").
    return f"mqtt-pairing:{socket.gethostname()}"[:64]


class Settings(BaseSettings):
    """All settings of `mqtt-pairing serve` and the admin commands.

    Raises:
        pydantic.ValidationError: on a bad value; use `load_settings` to get a
            one-line `ConfigError` instead.
    """

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_prefix="")

    # MQTT
    mqtt_url: str | None = None
    mqtt_protocol: Literal["5", "3.1.1"] = "5"
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    mqtt_ca_file: str | None = None
    mqtt_tls_insecure: bool = False
    mqtt_client_id: str = Field(default_factory=_default_client_id, min_length=1, max_length=64)
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_session_expiry_s: int = Field(default=60, ge=0, le=86400)
    mqtt_reconnect_max_s: float = Field(default=30.0, gt=0)

    # Redis
    redis_url: str | None = None
    redis_host: str | None = None
    redis_port: int = 6379
    redis_password: SecretStr | None = None
    redis_db: int = Field(default=0, ge=0)
    redis_cluster_url: str | None = None
    redis_timeout_s: float = Field(default=1.0, gt=0)

    # Pairing
    pairing_secret: SecretStr | None = None
    pairing_topic_prefix: str = "pairing"
    pairing_key_prefix: str = "pairing"
    pairing_shared_group: str | None = None
    pairing_session_idle_ttl_s: int = Field(default=2_592_000, ge=1)
    pairing_max_sessions_per_runner: int = Field(default=10, ge=1)

    pairing_code_ttl_s: int = Field(default=600, ge=1)
    pairing_code_ttl_min_s: int = Field(default=60, ge=1)
    pairing_code_ttl_max_s: int = Field(default=86_400, ge=1)
    pairing_code_max_uses: int = Field(default=1, ge=1)
    pairing_code_max_uses_max: int = Field(default=10, ge=1)
    pairing_code_tombstone_s: int = Field(default=3600, ge=0)

    pairing_fail_limit: int = Field(default=5, ge=1)
    pairing_fail_window_s: int = Field(default=60, ge=1)
    pairing_penalty_s: int = Field(default=300, ge=1)
    pairing_penalty_max_s: int = Field(default=86_400, ge=1)
    pairing_penalty_memory_s: int = Field(default=86_400, ge=1)
    pairing_app_request_limit: int = Field(default=20, ge=1)
    pairing_app_request_window_s: int = Field(default=60, ge=1)
    pairing_runner_code_limit: int = Field(default=10, ge=1)
    pairing_runner_code_window_s: int = Field(default=60, ge=1)
    pairing_message_limit: int = Field(default=30, ge=1)
    pairing_message_window_s: int = Field(default=60, ge=1)
    pairing_global_fail_limit: int = Field(default=600, ge=1)
    pairing_global_fail_window_s: int = Field(default=60, ge=1)
    pairing_global_fail_shards: int = Field(default=1, ge=1, le=1024)

    pairing_dedupe_ttl_s: int = Field(default=600, ge=1)
    pairing_pending_lease_s: int = Field(default=10, ge=1)
    pairing_reply_expiry_s: int = Field(default=600, ge=1)
    pairing_max_inflight: int = Field(default=256, ge=1)
    pairing_max_inflight_per_client: int = Field(default=32, ge=1)
    pairing_max_requests_per_client_s: float = Field(default=100.0, gt=0)
    pairing_shutdown_grace_s: float = Field(default=10.0, ge=0)
    pairing_health_listen: str | None = None
    pairing_heartbeat_online_s: int = Field(default=30, ge=1)
    pairing_presence_lease_s: float = Field(default=10.0, gt=0)
    pairing_presence_backlog: int = Field(default=100_000, ge=100)
    pairing_presence_announce_max: int = Field(default=4, ge=1)
    pairing_presence_announce_window_s: int = Field(default=60, ge=1)
    pairing_presence_reconcile_s: float = Field(default=3600.0, ge=0)
    pairing_sweep_interval_s: float = Field(default=0.5, gt=0)
    pairing_outbox_lease_s: float = Field(default=5.0, gt=0)
    pairing_index_shards: int = Field(default=1, ge=1, le=1024)
    pairing_history_max_len: int = Field(default=1_000_000, ge=100)
    pairing_history_identity_max_len: int = Field(default=10_000, ge=10)
    pairing_history_retention_s: int = Field(default=30 * 86_400, ge=60)

    @model_validator(mode="before")
    @classmethod
    def _url_wins(cls, data: Any) -> Any:  # noqa: ANN401 - whatever the sources hold
        """With `REDIS_URL` or `REDIS_CLUSTER_URL`, ignore the `REDIS_HOST` group.

        `REDIS_HOST`, `REDIS_PORT` and `REDIS_DB` are then ignored, whatever they hold
        (Kubernetes sets `REDIS_PORT=tcp://...` in every pod for a service named redis).
        """
        if isinstance(data, dict) and (data.get("redis_url") or data.get("redis_cluster_url")):
            return {k: v for k, v in data.items() if k not in _REDIS_HOST_GROUP}
        return data

    @field_validator("pairing_topic_prefix", "pairing_key_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#{}\x00 ") or value.startswith(("/", "$")):
            raise ValueError(
                "must be non-empty, without wildcards, braces, spaces or a leading / or $"
            )
        if value.endswith("/"):
            raise ValueError("must not end with /")
        return value

    @field_validator("pairing_shared_group")
    @classmethod
    def _check_shared_group(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "/+#\x00"):
            raise ValueError("must not contain '/', '+', '#' or NUL (an MQTT 5 share name)")
        return value

    @property
    def tombstones(self) -> TombstoneLayout:
        """Where expired codes are remembered (`mqtt_pairing.tombstones`)."""
        return TombstoneLayout(tombstone_ms=self.pairing_code_tombstone_s * 1000)

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if self.pairing_code_ttl_min_s > self.pairing_code_ttl_max_s:
            raise ValueError("PAIRING_CODE_TTL_MIN_S must not exceed PAIRING_CODE_TTL_MAX_S")
        if self.pairing_global_fail_shards > self.pairing_global_fail_limit:
            raise ValueError(
                "PAIRING_GLOBAL_FAIL_SHARDS must not exceed PAIRING_GLOBAL_FAIL_LIMIT "
                "(each shard holds at least one unit)"
            )
        if self.pairing_code_max_uses > self.pairing_code_max_uses_max:
            raise ValueError("PAIRING_CODE_MAX_USES must not exceed PAIRING_CODE_MAX_USES_MAX")
        return self

    @field_validator("pairing_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes")
        return value

    @property
    def embedded_broker(self) -> bool:
        """True when no `MQTT_URL` is set: `serve` runs the embedded amqtt broker."""
        return not self.mqtt_url

    @property
    def external_redis(self) -> bool:
        """True when any Redis setting points at an external server."""
        return bool(self.redis_url or self.redis_host or self.redis_cluster_url)

    def resolved_redis_url(self) -> str | None:
        """The Redis URL to connect to, or None for the in-memory store.

        `REDIS_URL` wins over the `REDIS_HOST` group (docs/design.md, settings).
        """
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            auth = ""
            if self.redis_password is not None:
                auth = ":" + quote(self.redis_password.get_secret_value(), safe="") + "@"
            return f"redis://{auth}{self.redis_host}:{self.redis_port}/{self.redis_db}"
        return None


def check_service_client_id(client_id: str) -> None:
    """Refuse a service client id that a runner or app could also connect with.

    On the shipped broker configuration a runner's or app's client id is its username,
    which matches the id pattern; an id outside it (the default `mqtt-pairing:<hostname>`
    has a `:`) can never be taken over from those listeners (docs/security.md).

    Raises:
        ConfigError: `client_id` matches the runner/app id pattern (one line).
    """
    if is_valid_id(client_id):
        raise ConfigError(
            "MQTT_CLIENT_ID: must not look like a runner or app id (a runner or app could "
            "then take the service's connection over); put a ':' in it, e.g. "
            "mqtt-pairing:instance-1"
        )


def derive_shared_group(secret: bytes) -> str:
    """The shared-subscription group name derived from `PAIRING_SECRET`.

    HMAC-SHA256(secret, `SHARED_GROUP_LABEL`), 128 bits in hex: every instance with the
    same secret derives the same name, and no runner or app can (docs/security.md,
    "The service's request stream").

    Args:
        secret: `PAIRING_SECRET` as bytes.

    Returns:
        ``mqtt-pairing-`` and 32 hex digits.
    """
    digest = hmac.new(secret, SHARED_GROUP_LABEL, hashlib.sha256).hexdigest()
    return f"mqtt-pairing-{digest[:32]}"


def shared_group(settings: Settings, secret: bytes, *, secret_generated: bool = False) -> str:
    """The share group the service subscribes with; "" means no `$share`.

    `PAIRING_SHARED_GROUP` when set (a short or the old public name is logged as a
    warning: anyone who knows the name can join the group); else derived from the
    secret; "" when the secret was generated for this process (the in-memory store
    serves one instance, so there is no group to share).

    Args:
        settings: the settings.
        secret: `PAIRING_SECRET` as bytes (or the one generated for this process).
        secret_generated: True when `secret` was generated for this process.

    Returns:
        The group name, or "".
    """
    group = settings.pairing_shared_group
    if group is None:
        return "" if secret_generated else derive_shared_group(secret)
    if group and (len(group) < _MIN_SAFE_GROUP_CHARS or group == LEGACY_SHARED_GROUP):
        log.warning(
            "PAIRING_SHARED_GROUP is short or well known: a runner or app that names it "
            "joins the service's group and takes requests away from it; unset it to use "
            "a name derived from PAIRING_SECRET (docs/security.md)"
        )
    return group


def redact_url(url: str) -> str:
    """Return `url` with any password replaced by `***`, for log lines."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment, with `overrides` (field names) on top.

    Raises:
        ConfigError: one line naming the first bad setting; the value is never echoed.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def _one_line(exc: ValidationError) -> str:
    err = exc.errors(include_input=False, include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]).upper()
    msg = str(err["msg"]).removeprefix("Value error, ")
    if loc == "REDIS_PORT" and err["type"].startswith("int"):
        if "://" in os.environ.get("REDIS_PORT", ""):
            return (
                "REDIS_PORT: must be a port number, not a URL (Kubernetes sets REDIS_PORT"
                " for a service named redis; set REDIS_URL instead)"
            )
        return "REDIS_PORT: must be a port number"
    if not loc:
        return f"invalid settings: {msg}"
    return f"{loc}: {msg}"
