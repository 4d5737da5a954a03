"""Pure rules of limits, penalties and presence (no I/O; time is a parameter).

These are the model of the rules that the Lua scripts enforce; tests compare the two.
Numbers come from docs/protocol.md "Default limits" and "Presence" through the settings.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def penalty_ms(strikes: int, *, first_ms: int, max_ms: int) -> int:
    """Length of the `strikes`-th automatic penalty in a row: doubling, capped.

    docs/protocol.md: 300 s first; each further penalty within 24 h doubles, up to 24 h.

    Args:
        strikes: 1 for the first penalty, 2 for the next within the memory, ...
        first_ms: the first penalty, ms.
        max_ms: the longest penalty, ms.

    Raises:
        ValueError: strikes < 1.
    """
    if strikes < 1:
        raise ValueError("strikes start at 1")
    return int(min(first_ms * 2 ** min(strikes - 1, 40), max_ms))


@dataclass
class SlidingWindow:
    """A sliding-window log: at most `limit` events in any `window_ms` (exclusive start).

    An event at time t counts while now < t + window_ms, as in the Lua scripts
    (`ZREMRANGEBYSCORE key -inf now-window`).
    """

    limit: int
    window_ms: int
    events: deque[int] = field(default_factory=deque)

    def _trim(self, now_ms: int) -> None:
        while self.events and self.events[0] <= now_ms - self.window_ms:
            self.events.popleft()

    def retry_after_ms(self, now_ms: int) -> int:
        """0 if an event may happen at `now_ms`, else ms until the oldest leaves."""
        self._trim(now_ms)
        if len(self.events) < self.limit:
            return 0
        return self.events[0] + self.window_ms - now_ms

    def admit(self, now_ms: int) -> bool:
        """Record an event at `now_ms` if the window allows it; True if admitted.

        Raises:
            ValueError: time went backwards.
        """
        if self.events and now_ms < self.events[-1]:
            raise ValueError("time must not go backwards")
        if self.retry_after_ms(now_ms):
            return False
        self.events.append(now_ms)
        return True

    def count(self, now_ms: int) -> int:
        """Events in the window ending at `now_ms`."""
        self._trim(now_ms)
        return len(self.events)


@dataclass
class FailurePolicy:
    """Failed guesses of one app: `limit` in `window_ms` starts a doubling penalty.

    Model of `finish_request.lua` and the penalty check of `begin_request.lua`.
    """

    limit: int
    window_ms: int
    first_penalty_ms: int
    max_penalty_ms: int
    memory_ms: int
    failures: SlidingWindow = field(init=False)
    strikes: int = 0
    last_penalty_end_ms: int = 0
    penalty_until_ms: int = 0

    def __post_init__(self) -> None:
        self.failures = SlidingWindow(self.limit, self.window_ms)

    def blocked_for_ms(self, now_ms: int) -> int:
        """Ms left of the current penalty (0: none)."""
        return max(0, self.penalty_until_ms - now_ms)

    def record_failure(self, now_ms: int) -> int:
        """Record a failed guess; returns the penalty (ms) it starts, or 0."""
        self.failures.events.append(now_ms)
        if self.failures.count(now_ms) < self.limit:
            return 0
        if now_ms - self.last_penalty_end_ms > self.memory_ms:
            self.strikes = 0
        self.strikes += 1
        pen = penalty_ms(self.strikes, first_ms=self.first_penalty_ms, max_ms=self.max_penalty_ms)
        self.penalty_until_ms = self.last_penalty_end_ms = now_ms + pen
        self.failures.events.clear()
        return pen

    def record_success(self) -> None:
        """A success clears the failure window (not the doubling)."""
        self.failures.events.clear()


def presence(
    status: str | None,
    status_ms: int,
    heartbeat_ms: int,
    now_ms: int,
    *,
    heartbeat_online_ms: int = 30_000,
) -> bool | None:
    """A runner's presence by docs/protocol.md "Presence".

    Offline (False) if the newest of its status messages and heartbeats is a status
    `offline`; online (True) if not offline and either its last status is `online` or a
    heartbeat came within `heartbeat_online_ms`; otherwise unknown (None).

    Args:
        status: last status state (`online`, `offline`) or None if none was seen.
        status_ms: when that status was recorded, ms (0 if none).
        heartbeat_ms: when the last heartbeat came, ms (0 if none).
        now_ms: the current time, ms.
        heartbeat_online_ms: how long a heartbeat makes a runner online, ms.
    """
    if status == "offline" and status_ms >= heartbeat_ms:
        return False
    if status == "online":
        return True
    if heartbeat_ms and now_ms - heartbeat_ms < heartbeat_online_ms:
        return True
    return None
