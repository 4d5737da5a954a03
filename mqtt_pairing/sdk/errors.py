"""What the SDK raises (docs/sdk.md, "Errors").

::

    Exception
    └── SdkError
        ├── ConnectFailed        the first connection was refused or never made
        ├── NotConnected         (also a TimeoutError) no broker connection in time
        ├── NoReply              (also a TimeoutError) no reply to a request in time
        ├── ReplyError           an error reply: `code`, `message`, `retry_after_s`
        ├── KeyMismatch          the runner's key is not the one its pairing URI named
        └── E2eFailed            no end-to-end exchange, with `require_e2e`

A `ReplyError` carries the wire error code (`mqtt_pairing.errors.PairingErrorCode`,
docs/protocol.md "Error codes"); `retryable` says whether the same request may succeed
later (`mqtt_pairing.sdk.retry` waits `retry_after_s` and tries again).
"""

from __future__ import annotations

from typing import Any

from mqtt_pairing.errors import PairingErrorCode

__all__ = [
    "RETRYABLE",
    "ConnectFailed",
    "E2eFailed",
    "KeyMismatch",
    "NoReply",
    "NotConnected",
    "ReplyError",
    "SdkError",
]

RETRYABLE = frozenset(
    {
        PairingErrorCode.RATE_LIMITED,
        PairingErrorCode.SERVICE_UNAVAILABLE,
        PairingErrorCode.INTERNAL_ERROR,
    }
)
"""Codes whose replies the service does not remember, and that time can change.

`BANNED` (an admin's decision) and `RUNNER_OFFLINE` (a person must act) are not retried
automatically even though they are not remembered either.
"""


class SdkError(Exception):
    """Base of everything the SDK raises."""


class ConnectFailed(SdkError):
    """The broker refused the connection (credentials, client id) or never answered."""


class NotConnected(SdkError, TimeoutError):
    """No broker connection within the time allowed (the SDK keeps reconnecting)."""


class NoReply(SdkError, TimeoutError):
    """No reply to a request within its timeout (`op` and `request_id` say which)."""

    def __init__(self, op: str, request_id: str, timeout_s: float) -> None:
        self.op = op
        self.request_id = request_id
        super().__init__(f"no reply to {op} ({request_id}) within {timeout_s:g} s")


class ReplyError(SdkError):
    """An error reply (docs/protocol.md, "Reply envelope").

    Attributes:
        code: the wire error code; an unknown code from a newer service becomes
            `INTERNAL_ERROR`, and `raw_code` keeps it.
        raw_code: the code as sent.
        message: the service's message (never echoes input).
        retry_after_s: whole seconds before a retry may succeed, or None.
        request_id: the request it answers.
        reply: the whole reply envelope.
    """

    def __init__(self, reply: dict[str, Any]) -> None:
        error = reply.get("error")
        error = error if isinstance(error, dict) else {}
        self.reply = reply
        self.raw_code = str(error.get("code", PairingErrorCode.INTERNAL_ERROR.value))
        try:
            self.code = PairingErrorCode(self.raw_code)
        except ValueError:
            self.code = PairingErrorCode.INTERNAL_ERROR
        self.message = str(error.get("message", ""))
        retry = error.get("retry_after_s")
        self.retry_after_s: int | None = retry if isinstance(retry, int) else None
        self.request_id = reply.get("request_id")
        super().__init__(f"{self.raw_code}: {self.message}")

    @property
    def retryable(self) -> bool:
        """Whether trying again later may succeed (`RETRYABLE`)."""
        return self.code in RETRYABLE


class KeyMismatch(SdkError):
    """The runner's public key does not match the `key` its pairing URI named.

    The SDK has already closed the session: a relay replaced the runner's key.
    """


class E2eFailed(SdkError):
    """The end-to-end exchange did not complete and `require_e2e` was set.

    The runner sent no key, did not answer the commitment in time, or sent an unusable
    key (docs/protocol.md, "End-to-end keys and SAS"). The SDK has already closed the
    session (`session_id` says which).
    """

    def __init__(self, session_id: str, why: str) -> None:
        self.session_id = session_id
        super().__init__(f"session {session_id}: {why}; the session was closed")
