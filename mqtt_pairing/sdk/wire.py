"""What the service publishes, as pydantic models (docs/protocol.md): results and events.

The SDK parses replies and events into these; `mqtt-pairing asyncapi` turns them (and the
request models of `mqtt_pairing.models`) into the schemas of `docs/asyncapi.yaml`. Unknown
fields are ignored, so that an older SDK reads a newer service's messages.
Timestamps are RFC 3339 UTC with milliseconds (`2026-11-29T12:00:00.000Z`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    StrictBool,
    StrictInt,
)

from mqtt_pairing.errors import PairingErrorCode
from mqtt_pairing.sas import Sas, SessionSecrets

E2eState = Literal["ready", "none", "failed", "pending"]
"""Where a session's end-to-end exchange stands (docs/sdk.md, "End-to-end keys and SAS"):
`ready` (the SAS is there to compare), `none` (the peer did not take part, or not in time:
unverified), `failed` (tampering seen: a reveal that does not open the commitment, or an
unusable key; the SDK closed the session), `pending` (still waiting for the peer)."""

__all__ = [
    "CancelCodeResult",
    "CodeResult",
    "CodeUsed",
    "ErrorBody",
    "Event",
    "MessageResult",
    "PairResult",
    "RunnerPresence",
    "RunnerState",
    "RunnerStatus",
    "Session",
    "SessionClosed",
    "SessionMessage",
    "SessionOpened",
    "SessionsResult",
    "StatusResult",
    "UnpairResult",
]

TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"


def _format_ts(value: datetime) -> str:
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


Timestamp = Annotated[
    datetime,
    Field(json_schema_extra={"pattern": TIMESTAMP_PATTERN}),
    PlainSerializer(_format_ts, return_type=str, when_used="json"),
]
"""RFC 3339 UTC with milliseconds on the wire; an aware `datetime` in Python."""

PeerId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
SessionId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")]
PublicKey = Annotated[str, Field(max_length=512)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Session(_Wire):
    """The Session object (docs/protocol.md, "Session object")."""

    session_id: SessionId
    runner_id: PeerId
    app_id: PeerId
    runner_name: str | None
    app_name: str | None
    created_at: Timestamp
    last_seen_at: Timestamp
    state: Literal["active", "closed"]
    closed_reason: (
        Literal["unpaired_by_app", "unpaired_by_runner", "revoked", "replaced", "expired"] | None
    ) = Field(default=None, description="Present only on a closed session.")


class _WithSecrets(_Wire):
    """A message after which this side can derive the session key and SAS."""

    _secrets: SessionSecrets | None = PrivateAttr(default=None)
    _e2e: E2eState = PrivateAttr(default="none")

    @property
    def e2e(self) -> E2eState:
        """Where the end-to-end exchange of this session stands (`E2eState`)."""
        return "ready" if self._secrets is not None else self._e2e

    @property
    def verified(self) -> bool:
        """True when the exchange completed and `sas` is there for the people to compare.

        Only the people comparing the two screens can confirm the pairing; False means
        there is nothing to compare (see `e2e`).
        """
        return self._secrets is not None

    @property
    def sas(self) -> Sas | None:
        """The short authentication string to compare with the other side.

        None unless the commit-then-reveal exchange completed (docs/protocol.md, "End-to-end
        keys and SAS"); `e2e` says why not.
        """
        return None if self._secrets is None else self._secrets.sas

    @property
    def session_key(self) -> bytes | None:
        """32 bytes only the two ends know, or None (see `sas`)."""
        return None if self._secrets is None else self._secrets.session_key


# -- results (the `result` of a success reply, by op) ---------------------------------


class CodeResult(_Wire):
    """Runner `code` result (docs/protocol.md, "Runner code").

    `pairing_uri` is the service's; a runner SDK that sent a key adds `&key=<key id>` to
    it for its QR code (docs/protocol.md, "End-to-end keys and SAS").
    """

    code: Annotated[
        str, Field(pattern=r"^[0-9A-HJKMNP-TV-Z]{3}-[0-9A-HJKMNP-TV-Z]{3}-[0-9A-HJKMNP-TV-Z]{3}$")
    ]
    expires_at: Timestamp
    ttl_s: StrictInt
    max_uses: StrictInt
    pairing_uri: Annotated[
        str, Field(pattern=r"^mqtt-pairing://pair\?code=[0-9A-HJKMNP-TV-Z]{9}&runner=")
    ]


class CancelCodeResult(_Wire):
    """Runner `cancel-code` result."""

    cancelled: StrictBool


class SessionsResult(_Wire):
    """Runner or app `sessions` result: the caller's active sessions."""

    sessions: list[Session]


class UnpairResult(_Wire):
    """Runner or app `unpair` result: how many sessions closed."""

    closed: StrictInt


class MessageResult(_Wire):
    """Runner or app `message` result: the event went to the other party."""

    sent: StrictBool


class PairResult(_WithSecrets):
    """App `pair` result (docs/protocol.md, "App pair")."""

    session: Session
    runner_public_key: PublicKey | None
    runner_metadata: dict[str, Any] | None


class RunnerState(_Wire):
    """One paired runner in an app's `status` result."""

    runner_id: PeerId
    online: StrictBool | None = Field(description="null when unknown (docs/protocol.md).")
    session_id: SessionId


class StatusResult(_Wire):
    """App `status` result."""

    paired: StrictBool
    runners: list[RunnerState]


class ErrorBody(_Wire):
    """The `error` of an error reply (docs/protocol.md, "Error codes")."""

    code: PairingErrorCode
    message: str
    retry_after_s: StrictInt | None = Field(
        default=None, description="Present with RATE_LIMITED, SERVICE_UNAVAILABLE, BANNED."
    )


# -- events ---------------------------------------------------------------------------


class _Event(_Wire):
    event_id: Annotated[str, Field(min_length=1)]
    at: Timestamp


class SessionOpened(_Event, _WithSecrets):
    """`session.opened`, to both parties (docs/protocol.md, "App pair")."""

    event: Literal["session.opened"]
    session: Session
    app_public_key: PublicKey | None
    app_metadata: dict[str, Any] | None


class SessionClosed(_Event):
    """`session.closed`, to both parties (docs/protocol.md, "Session object")."""

    event: Literal["session.closed"]
    session: Session


class CodeUsed(_Event):
    """`code.used`, to the runner after each use of its code."""

    event: Literal["code.used"]
    uses_left: StrictInt


class RunnerPresence(_Event):
    """`runner.online` / `runner.offline`, to each app paired with the runner."""

    event: Literal["runner.online", "runner.offline"]
    runner_id: PeerId
    session_id: SessionId

    @property
    def online(self) -> bool:
        """True for `runner.online`."""
        return self.event == "runner.online"


class SessionMessage(_Event):
    """`session.message`: what the other party of a session sent (`message` op).

    docs/protocol.md, "Runner and app message".
    """

    event: Literal["session.message"]
    session_id: SessionId
    from_: Literal["runner", "app"] = Field(alias="from")
    data: dict[str, Any]


Event = SessionOpened | SessionClosed | CodeUsed | RunnerPresence | SessionMessage
"""Any event the service sends."""


class RunnerStatus(_Wire):
    """A runner's retained presence status, also its Last Will (docs/protocol.md)."""

    state: Literal["online", "offline"]
