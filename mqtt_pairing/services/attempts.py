"""Attempts: which requests this instance works on, and which it gave up on Redis for.

Pure bookkeeping, no I/O (the clock is passed in). docs/protocol.md "Idempotency": a
request with effects leaves a pending mark in Redis while it runs, and a copy of it
(same request_id) waits for the first one's reply until the mark's lease lapses
(`PAIRING_PENDING_LEASE_S`).

A command sent to a Redis that then stops answering (frozen, stalled) is not lost: Redis
runs it when it wakes up, after the store gave up on it and the app was told
SERVICE_UNAVAILABLE. The attempt's `begin_request` then writes a pending mark that no
one works on, and the app's retry, finding it, would wait the whole lease for a reply
that never comes. So this instance remembers the attempts it abandoned that way; a later
attempt of the same request on this instance, with no other attempt of it still running
here, takes the mark over at once instead of waiting (the steps of every op are
idempotent, so running them again ends the same way). A copy on another instance does
not know of the abandoned attempt and waits for the lease, as before.
"""

from __future__ import annotations

from collections import Counter

AttemptKey = tuple[str, str, str, str]
"""(kind, id, op, request_id) of a request."""

MAX_ABANDONED = 100_000
"""Abandoned attempts remembered at most (the oldest are forgotten first)."""


class Attempts:
    """Attempts of idempotent requests running here, and the ones abandoned lately.

    Args:
        remember_s: how long an abandoned attempt is remembered, seconds: the pending
            lease and a margin (a mark older than its lease is taken over anyway).
        max_abandoned: bound on the abandoned attempts remembered.
    """

    def __init__(self, remember_s: float, *, max_abandoned: int = MAX_ABANDONED) -> None:
        self.remember_s = remember_s
        self.max_abandoned = max_abandoned
        self._running: Counter[AttemptKey] = Counter()
        self._abandoned: dict[AttemptKey, float] = {}  # insertion order: oldest first

    def start(self, key: AttemptKey) -> None:
        """An attempt of `key` starts here."""
        self._running[key] += 1

    def end(self, key: AttemptKey, *, abandoned: bool, now_s: float) -> None:
        """An attempt of `key` ends.

        Args:
            key: the request.
            abandoned: it gave up on Redis (SERVICE_UNAVAILABLE) after it may have sent
                its pending mark.
            now_s: a monotonic clock, seconds.
        """
        self._running[key] -= 1
        if self._running[key] <= 0:
            del self._running[key]
        self._prune(now_s)
        if abandoned:
            self._abandoned.pop(key, None)
            self._abandoned[key] = now_s
            while len(self._abandoned) > self.max_abandoned:
                del self._abandoned[next(iter(self._abandoned))]

    def take_over(self, key: AttemptKey, *, now_s: float) -> bool:
        """Whether the running attempt of `key` may take its pending mark over at once.

        True, once per abandoned attempt, when this instance abandoned an attempt of
        `key` within `remember_s` and no other attempt of `key` runs here (the one
        asking is running, hence "other").
        """
        self._prune(now_s)
        if self._running[key] > 1 or key not in self._abandoned:
            return False
        del self._abandoned[key]
        return True

    def _prune(self, now_s: float) -> None:
        oldest = now_s - self.remember_s
        while self._abandoned:
            key = next(iter(self._abandoned))
            if self._abandoned[key] >= oldest:
                break
            del self._abandoned[key]

    def __len__(self) -> int:
        """Abandoned attempts remembered now."""
        return len(self._abandoned)
