"""Domain records and wire messages (pydantic 2).

Wire messages follow docs/protocol.md, "Payloads": unknown fields are ignored, integer fields
refuse floats and booleans (strict mode), names are at most 64 characters without Unicode
Cc/Cf characters, `metadata` is an object of at most 1024 bytes as compact UTF-8 JSON,
`public_key` is at most 512 characters. Timestamps on the wire are RFC 3339 UTC with
milliseconds; inside the service they are integer milliseconds since the epoch (`*_ms`),
as Redis `TIME` gives them.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt

from mqtt_pairing.errors import PairingErrorCode
from mqtt_pairing.payload import compact_json_size, is_clean_name
from mqtt_pairing.topics import ID_PATTERN

MAX_NAME_CHARS = 64
MAX_METADATA_BYTES = 1024
MAX_PUBLIC_KEY_CHARS = 512


def format_ts(at_ms: int) -> str:
    """Format epoch milliseconds as RFC 3339 UTC with milliseconds (`...T12:00:00.000Z`)."""
    secs, ms = divmod(at_ms, 1000)
    return f"{_format_second(secs)}.{ms:03d}Z"


@functools.lru_cache(maxsize=256)
def _format_second(secs: int) -> str:
    # A request formats a few timestamps of the same second or two: cached, since
    # datetime formatting is the dearer part.
    return datetime.fromtimestamp(secs, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _check_name(value: str) -> str:
    if not is_clean_name(value):
        raise ValueError("names must not contain control or format characters")
    return value


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    if compact_json_size(value) > MAX_METADATA_BYTES:
        raise ValueError("metadata is larger than 1024 bytes")
    return value


def _check_id(value: str) -> str:
    if not ID_PATTERN.fullmatch(value):
        raise ValueError("not a valid id")
    return value


RequestId = Annotated[str, Field(pattern=r"^[\x21-\x7e]{1,64}$")]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_check_name)]
Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]
PublicKey = Annotated[str, Field(max_length=MAX_PUBLIC_KEY_CHARS)]
PeerId = Annotated[str, AfterValidator(_check_id)]
SessionId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class CodeRequest(_Request):
    """Runner `code` request (docs/protocol.md, "Runner code")."""

    request_id: RequestId
    ttl_s: StrictInt | None = None
    max_uses: StrictInt | None = None
    runner_name: Name | None = None
    metadata: Metadata | None = None
    public_key: PublicKey | None = None


class PairRequest(_Request):
    """App `pair` request (docs/protocol.md, "App pair")."""

    request_id: RequestId
    code: str
    app_name: Name | None = None
    metadata: Metadata | None = None
    public_key: PublicKey | None = None


class SimpleRequest(_Request):
    """A request with only a `request_id`: `cancel-code`, `sessions`, `status`."""

    request_id: RequestId


class HeartbeatRequest(_Request):
    """Runner `heartbeat`: `{}` or `{"request_id"}`."""

    request_id: RequestId | None = None


class RunnerUnpairRequest(_Request):
    """Runner `unpair`: exactly one of `session_id`, `app_id`, `all: true`."""

    request_id: RequestId
    session_id: SessionId | None = None
    app_id: PeerId | None = None
    all: StrictBool | None = None


class AppUnpairRequest(_Request):
    """App `unpair`: `{"request_id", "session_id"}`."""

    request_id: RequestId
    session_id: SessionId


class MessageRequest(_Request):
    """Runner or app `message`: relay `data` to the other party of a session.

    docs/protocol.md, "Runner and app message": `data` is a JSON object of at most 1024
    bytes as compact UTF-8 JSON, relayed untouched.
    """

    request_id: RequestId
    session_id: SessionId
    data: Metadata


class SessionState(StrEnum):
    """State of a pairing session; `closed` is terminal."""

    ACTIVE = "active"
    CLOSED = "closed"


class ClosedReason(StrEnum):
    """Why a session closed (docs/protocol.md, "Session object")."""

    UNPAIRED_BY_APP = "unpaired_by_app"
    UNPAIRED_BY_RUNNER = "unpaired_by_runner"
    REVOKED = "revoked"
    REPLACED = "replaced"
    EXPIRED = "expired"


class PairingSession(BaseModel):
    """A pairing session as stored (times in epoch ms) and shown on the wire."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    runner_id: str
    app_id: str
    runner_name: str | None = None
    app_name: str | None = None
    created_at_ms: int
    last_seen_at_ms: int
    state: SessionState = SessionState.ACTIVE
    closed_reason: ClosedReason | None = None
    closed_at_ms: int | None = None

    def to_wire(self) -> dict[str, Any]:
        """The Session object of docs/protocol.md (RFC 3339 timestamps)."""
        out: dict[str, Any] = {
            "session_id": self.session_id,
            "runner_id": self.runner_id,
            "app_id": self.app_id,
            "runner_name": self.runner_name,
            "app_name": self.app_name,
            "created_at": format_ts(self.created_at_ms),
            "last_seen_at": format_ts(self.last_seen_at_ms),
            "state": self.state.value,
        }
        if self.closed_reason is not None:
            out["closed_reason"] = self.closed_reason.value
        return out


class CodeState(StrEnum):
    """State of a pairing code; every state but `active` is terminal."""

    ACTIVE = "active"
    USED = "used"
    REPLACED = "replaced"
    CANCELLED = "cancelled"


class PairingCodeEntry(BaseModel):
    """A pairing code as the store keeps it: never the code itself, only its digest.

    Attributes:
        digest: HMAC-SHA256(PAIRING_SECRET, code), 96 bits as hex (docs/design.md).
        masked: the code as shown to operators, `7**-***-*** #3f9a1c2e`.
    """

    model_config = ConfigDict(frozen=True)

    runner_id: str
    digest: str
    masked: str
    state: CodeState
    max_uses: int
    uses_left: int
    created_at_ms: int
    expires_at_ms: int


class IssuedCode(BaseModel):
    """What the runner is told about a new code (the `code` result)."""

    model_config = ConfigDict(frozen=True)

    code: str
    expires_at_ms: int
    ttl_s: int
    max_uses: int
    pairing_uri: str

    def to_wire(self) -> dict[str, Any]:
        """The result object of the runner `code` op (docs/protocol.md)."""
        return {
            "code": self.code,
            "expires_at": format_ts(self.expires_at_ms),
            "ttl_s": self.ttl_s,
            "max_uses": self.max_uses,
            "pairing_uri": self.pairing_uri,
        }


class RateLimitEntry(BaseModel):
    """The limit state of one app or runner, as admin commands show it."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["runner", "app"]
    id: str
    failures_in_window: int = 0
    requests_in_window: int = 0
    strikes: int = 0
    penalty_until_ms: int | None = None


class PairingHistoryEntry(BaseModel):
    """One audit record; codes appear only masked (docs/protocol.md, "Codes")."""

    model_config = ConfigDict(frozen=True)

    event: str
    at_ms: int
    runner_id: str | None = None
    app_id: str | None = None
    session_id: str | None = None
    code_mask: str | None = None
    error_code: PairingErrorCode | None = None
    detail: str | None = None


def ok_reply(request_id: str | None, result: dict[str, Any]) -> dict[str, Any]:
    """The success envelope of docs/protocol.md: `{"request_id", "ok": true, "result"}`."""
    return {"request_id": request_id, "ok": True, "result": result}


def error_reply(
    request_id: str | None,
    code: PairingErrorCode,
    message: str,
    retry_after_s: int | None = None,
) -> dict[str, Any]:
    """The error envelope of docs/protocol.md, with `retry_after_s` when given."""
    error: dict[str, Any] = {"code": code.value, "message": message}
    if retry_after_s is not None:
        error["retry_after_s"] = retry_after_s
    return {"request_id": request_id, "ok": False, "error": error}
