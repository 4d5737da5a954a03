"""Is another client using our MQTT client id? Decided only on evidence; no I/O here.

`mqtt_link.MqttLink` feeds a `TwinJudge` what happened to its connection (connected, a
connect attempt failed, the connection was lost and how) with the loop's clock, and asks
it two things: whether a loss is a *takeover* (back off minutes) or a plain loss (the
normal short backoff), and whether a twin is currently believed (`/readyz` 503).

Evidence, and only evidence:

- A DISCONNECT with reason 0x8E (Session taken over): a twin, at once (MQTT 5 brokers
  that say so: Mosquitto from 2.0.15, EMQX, HiveMQ).
- An error without a reason code (an operation of ours failed): nothing, either way.
- Any other DISCONNECT reason, a keepalive timeout on our side, or a close followed by a
  refused reconnect (a broker restart): a plain loss. It also clears a twin believed
  before (the other client may be long gone; what we see now is the broker or network).
- A socket closed without DISCONNECT (the only sign Mosquitto 2.0.11 gives of a takeover,
  on MQTT 3.1.1 and 5 alike, and also what a reset by a NAT or load balancer looks like)
  is *short* when the connection had been up less than `SHORT_S`. Such a close counts once
  the reconnect after it succeeds (a refused reconnect makes it plain). `TWIN_CLOSES`
  counted closes within `TWIN_WINDOW_S` make a twin. A close after a long-lived
  connection never counts: a reset by the network looks the same.
- While a twin is believed, a short close is a takeover at once (back off); any other
  close reconnects at the normal backoff.

A believed twin clears when a connection stays up `TWIN_CLEAR_S`, or on a plain loss.
`tests/unit/test_twin_judge.py` pins these rules; `tests/reliability/test_twin.py` and
`tests/reliability/test_connection_resets.py` check them against Mosquitto.
"""

from __future__ import annotations

import enum
from collections import deque

SHORT_S = 5.0
"""A connection closed before it was up this long (seconds) is a *short* close."""
TWIN_CLOSES = 3
"""Counted closes within `TWIN_WINDOW_S` that make a twin."""
TWIN_WINDOW_S = 60.0
"""Seconds over which counted closes add up."""
TWIN_CLEAR_S = 240.0
"""A connection up this long (seconds) clears a believed twin."""


class Loss(enum.Enum):
    """How a connection that had been up ended."""

    TAKEN_OVER = "taken_over"
    """DISCONNECT with reason 0x8E (Session taken over)."""
    DISCONNECT = "disconnect"
    """DISCONNECT with any other reason."""
    TIMEOUT = "timeout"
    """Our side gave up: keepalive missed, or an operation of ours timed out."""
    CLOSED = "closed"
    """The socket was closed or reset without a DISCONNECT."""
    UNKNOWN = "unknown"
    """An error without a reason code (an operation of ours failed): no evidence either way."""


class Verdict(enum.Enum):
    """What to do after a loss."""

    PLAIN = "plain"
    """Reconnect at the normal backoff."""
    TAKEOVER = "takeover"
    """Another client took the session: back off long."""


class TwinJudge:
    """The classification state of one connection (one client id). Times in seconds."""

    def __init__(self) -> None:
        self._counted: deque[float] = deque()
        self._pending: tuple[float, bool] | None = None
        """A close (when, short) waiting for the next connect attempt's outcome."""
        self._twin = False
        self._up_since: float | None = None

    def connected(self, now: float) -> bool:
        """A connection was accepted (CONNACK). Returns True when this makes a new twin."""
        self._up_since = now
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        when, short = pending
        while self._counted and when - self._counted[0] > TWIN_WINDOW_S:
            self._counted.popleft()
        if short:
            self._counted.append(when)
        if not self._twin and len(self._counted) >= TWIN_CLOSES:
            self._twin = True
            return True
        return False

    def connect_failed(self) -> None:
        """A connect attempt failed: the close before it was the broker or the network."""
        self._up_since = None
        if self._pending is not None:
            self._pending = None
            self._clear()

    def lost(self, now: float, how: Loss) -> Verdict:
        """A connection that was up ended `how`; returns whether it was a takeover."""
        up_since, self._up_since = self._up_since, None
        up_s = now - up_since if up_since is not None else 0.0
        if up_s >= TWIN_CLEAR_S:
            self._clear()
        if how is Loss.TAKEN_OVER:
            self._pending = None
            self._twin = True
            return Verdict.TAKEOVER
        if how is Loss.UNKNOWN:
            self._pending = None
            return Verdict.PLAIN
        if how is not Loss.CLOSED:
            self._pending = None
            self._clear()
            return Verdict.PLAIN
        short = up_s < SHORT_S
        if self._twin and short:
            self._pending = None
            return Verdict.TAKEOVER
        self._pending = (now, short)
        return Verdict.PLAIN

    def twin(self, now: float) -> bool:
        """Whether another client is believed to use the client id now."""
        if self._up_since is not None and now - self._up_since >= TWIN_CLEAR_S:
            self._clear()
        return self._twin

    def _clear(self) -> None:
        self._twin = False
        self._counted.clear()
