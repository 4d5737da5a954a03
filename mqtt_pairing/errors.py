"""Error codes of the wire protocol and the exception tree of the service.

Error codes are those of docs/protocol.md, "Error codes". Exceptions are raised by the pure
core, the store and the services, and turned into an error reply in one place, the
dispatcher::

    Exception
    ├── ConfigError                 a bad setting (one line, names the setting)
    └── PairingError                carries a PairingErrorCode and a safe message
        ├── InvalidRequest          INVALID_REQUEST
        ├── InvalidCodeFormat       INVALID_FORMAT
        ├── CodeNotFound            CODE_NOT_FOUND
        ├── CodeExpired             CODE_EXPIRED
        ├── CodeAlreadyUsed         CODE_ALREADY_USED
        ├── RunnerOffline           RUNNER_OFFLINE
        ├── RateLimited             RATE_LIMITED (retry_after_s set)
        ├── Banned                  BANNED (retry_after_s set unless permanent)
        ├── SessionNotFound         SESSION_NOT_FOUND
        ├── SessionLimitReached     SESSION_LIMIT_REACHED
        ├── StoreUnavailable        SERVICE_UNAVAILABLE (retry_after_s set)
        └── InternalError           INTERNAL_ERROR

Messages never echo client input (docs/protocol.md: a code must not come back in an error).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class PairingErrorCode(StrEnum):
    """The error codes of docs/protocol.md, "Error codes"."""

    INVALID_REQUEST = "INVALID_REQUEST"
    INVALID_FORMAT = "INVALID_FORMAT"
    CODE_NOT_FOUND = "CODE_NOT_FOUND"
    CODE_EXPIRED = "CODE_EXPIRED"
    CODE_ALREADY_USED = "CODE_ALREADY_USED"
    RUNNER_OFFLINE = "RUNNER_OFFLINE"
    RATE_LIMITED = "RATE_LIMITED"
    BANNED = "BANNED"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_LIMIT_REACHED = "SESSION_LIMIT_REACHED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    @property
    def is_failed_guess(self) -> bool:
        """Whether a `pair` ending with this code counts as a failed guess (docs/protocol.md)."""
        return self in _FAILED_GUESS

    @property
    def is_remembered(self) -> bool:
        """Whether a reply with this code is remembered for idempotency (docs/protocol.md).

        Replies with RATE_LIMITED, BANNED, RUNNER_OFFLINE, SERVICE_UNAVAILABLE and
        INTERNAL_ERROR are not remembered: a retry is handled afresh.
        """
        return self not in _NOT_REMEMBERED


_FAILED_GUESS = frozenset(
    {
        PairingErrorCode.CODE_NOT_FOUND,
        PairingErrorCode.CODE_EXPIRED,
        PairingErrorCode.CODE_ALREADY_USED,
    }
)
_NOT_REMEMBERED = frozenset(
    {
        PairingErrorCode.RATE_LIMITED,
        PairingErrorCode.BANNED,
        PairingErrorCode.RUNNER_OFFLINE,
        PairingErrorCode.SERVICE_UNAVAILABLE,
        PairingErrorCode.INTERNAL_ERROR,
    }
)


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line naming the setting."""


class PairingError(Exception):
    """A domain error that becomes an error reply.

    Attributes:
        code: the wire error code.
        message: a short message that never echoes client input.
        retry_after_s: whole seconds after which a retry may succeed, or None.
    """

    code: ClassVar[PairingErrorCode] = PairingErrorCode.INTERNAL_ERROR
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, retry_after_s: int | None = None) -> None:
        self.message = message or self.default_message
        self.retry_after_s = retry_after_s
        super().__init__(self.message)

    @staticmethod
    def for_code(
        code: PairingErrorCode, message: str | None = None, *, retry_after_s: int | None = None
    ) -> PairingError:
        """Build the exception class that belongs to `code`."""
        return _BY_CODE[code](message, retry_after_s=retry_after_s)


class InvalidRequest(PairingError):
    """The payload, op or request_id is not acceptable (INVALID_REQUEST)."""

    code = PairingErrorCode.INVALID_REQUEST
    default_message = "invalid request"


class InvalidCodeFormat(PairingError):
    """The code is not 9 alphabet characters after normalisation (INVALID_FORMAT)."""

    code = PairingErrorCode.INVALID_FORMAT
    default_message = "the code is not 9 characters of the pairing alphabet"


class CodeNotFound(PairingError):
    """No such code (CODE_NOT_FOUND)."""

    code = PairingErrorCode.CODE_NOT_FOUND
    default_message = "no such code"


class CodeExpired(PairingError):
    """The code existed but its time ran out (CODE_EXPIRED)."""

    code = PairingErrorCode.CODE_EXPIRED
    default_message = "the code has expired"


class CodeAlreadyUsed(PairingError):
    """The code was used up, replaced or cancelled (CODE_ALREADY_USED)."""

    code = PairingErrorCode.CODE_ALREADY_USED
    default_message = "the code was already used"


class RunnerOffline(PairingError):
    """The runner is known to be offline (RUNNER_OFFLINE)."""

    code = PairingErrorCode.RUNNER_OFFLINE
    default_message = "the runner is offline"


class RateLimited(PairingError):
    """Too many requests or failed guesses (RATE_LIMITED)."""

    code = PairingErrorCode.RATE_LIMITED
    default_message = "too many requests"


class Banned(PairingError):
    """An admin ban is in force (BANNED)."""

    code = PairingErrorCode.BANNED
    default_message = "banned by an administrator"


class SessionNotFound(PairingError):
    """The session does not exist or is not the caller's (SESSION_NOT_FOUND)."""

    code = PairingErrorCode.SESSION_NOT_FOUND
    default_message = "no such session"


class SessionLimitReached(PairingError):
    """The runner already has the maximum of active sessions (SESSION_LIMIT_REACHED)."""

    code = PairingErrorCode.SESSION_LIMIT_REACHED
    default_message = "the runner has reached its session limit"


class StoreUnavailable(PairingError):
    """The store (Redis) is unreachable (SERVICE_UNAVAILABLE)."""

    code = PairingErrorCode.SERVICE_UNAVAILABLE
    default_message = "service temporarily unavailable"


class InternalError(PairingError):
    """Anything else (INTERNAL_ERROR); the message says nothing internal."""

    code = PairingErrorCode.INTERNAL_ERROR
    default_message = "internal error"


_BY_CODE: dict[PairingErrorCode, type[PairingError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        InvalidCodeFormat,
        CodeNotFound,
        CodeExpired,
        CodeAlreadyUsed,
        RunnerOffline,
        RateLimited,
        Banned,
        SessionNotFound,
        SessionLimitReached,
        StoreUnavailable,
        InternalError,
    )
}
