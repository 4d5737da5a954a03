"""An optional retry helper that honours `retry_after_s` (docs/sdk.md, "Errors")."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from mqtt_pairing.sdk.errors import ReplyError

__all__ = ["retry"]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def retry(
    call: Callable[[], Awaitable[T]],
    *,
    attempts: int = 3,
    max_wait_s: float = 60.0,
    default_wait_s: float = 1.0,
) -> T:
    """Await `call()`, again after `retry_after_s` while the error is retryable.

    Only error replies the service does not remember and that time may change are retried
    (`ReplyError.retryable`: RATE_LIMITED, SERVICE_UNAVAILABLE, INTERNAL_ERROR); each try
    is a new request. A wait longer than `max_wait_s` is not made: the error is raised.

    Args:
        call: makes one attempt, e.g. ``lambda: app.pair(code)``.
        attempts: tries in all (at least 1).
        max_wait_s: the longest single wait, seconds.
        default_wait_s: the wait when the reply gives no `retry_after_s`, seconds.

    Returns:
        What `call` returned.

    Raises:
        ReplyError: not retryable, the tries are spent, or the wait asked is too long.
    """
    for attempt in range(1, max(attempts, 1) + 1):
        try:
            return await call()
        except ReplyError as exc:
            wait_s = default_wait_s if exc.retry_after_s is None else float(exc.retry_after_s)
            if not exc.retryable or attempt >= attempts or wait_s > max_wait_s:
                raise
            log.info("%s; trying again in %g s (%d/%d)", exc.code, wait_s, attempt, attempts)
            await asyncio.sleep(wait_s)
    raise AssertionError("unreachable")  # pragma: no cover
