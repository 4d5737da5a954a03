"""Services: the rules of pairing over the store, without MQTT.

`PairingCodeService` issues and cancels codes, `PairingSessionService` pairs, lists and
closes sessions, `RateLimitService` applies the limits, bans and idempotency of
docs/protocol.md. The dispatcher composes them.
"""

from __future__ import annotations

from mqtt_pairing.services.codes import PairingCodeService
from mqtt_pairing.services.events import Event, event_id
from mqtt_pairing.services.ratelimit import RateLimitService
from mqtt_pairing.services.sessions import PairingSessionService

__all__ = ["Event", "PairingCodeService", "PairingSessionService", "RateLimitService", "event_id"]
