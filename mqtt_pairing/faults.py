"""Injectable fault points, for crash tests: the process kills itself at a named point.

Set `MQTT_PAIRING_FAULT_POINT` to one of `FAULT_POINTS` (tests only); the process sends
itself SIGKILL when it gets there, as a crash would, with nothing flushed or closed.
Unset (the default), a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "MQTT_PAIRING_FAULT_POINT"
FAULT_POINTS = frozenset(
    {
        "before_publish_events",  # state changed and its events are in the outbox
        "after_claim",  # a use of the code is claimed, the session not yet opened
    }
)


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL if `MQTT_PAIRING_FAULT_POINT` names this point."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
