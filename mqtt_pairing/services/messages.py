"""The `message` op: relay a small opaque object to the other party of an open session.

docs/protocol.md, "Runner and app message". The service reads the session (one read-only
script in the runner's slot) and publishes `session.message` straight away; it writes
nothing to Redis and remembers nothing, so the request rate is counted in this process
(`PAIRING_MESSAGE_LIMIT` per `PAIRING_MESSAGE_WINDOW_S` per sender and instance).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque

from mqtt_pairing.config import Settings
from mqtt_pairing.errors import RateLimited, SessionNotFound
from mqtt_pairing.models import MessageRequest
from mqtt_pairing.services.events import Event, session_message
from mqtt_pairing.store.redis_store import PairingStore
from mqtt_pairing.topics import Identity, Kind

__all__ = ["MessageRelay"]

_MAX_SENDERS = 100_000
"""Senders whose recent requests are remembered; the least recent beyond it are forgotten."""


class MessageRelay:
    """Checks and relays `message` requests.

    Args:
        store: the Redis store (read only here).
        settings: `pairing_message_limit` and `pairing_message_window_s`.
    """

    def __init__(self, store: PairingStore, settings: Settings) -> None:
        self.store = store
        self.limit = settings.pairing_message_limit
        self.window_s = float(settings.pairing_message_window_s)
        self._recent: OrderedDict[Identity, deque[float]] = OrderedDict()

    def _count(self, sender: Identity) -> None:
        now = time.monotonic()
        recent = self._recent.pop(sender, None) or deque()
        while recent and now - recent[0] >= self.window_s:
            recent.popleft()
        self._recent[sender] = recent
        while len(self._recent) > _MAX_SENDERS:
            self._recent.popitem(last=False)
        if len(recent) >= self.limit:
            retry = max(1, math.ceil(self.window_s - (now - recent[0])))
            raise RateLimited("too many messages", retry_after_s=retry)
        recent.append(now)

    async def relay(self, sender: Identity, req: MessageRequest) -> Event:
        """The `session.message` event for the other party of the sender's session.

        Raises:
            RateLimited: the sender's message rate (counted in this process).
            SessionNotFound: no active session with that id of which the sender is a party.
            StoreUnavailable: Redis is unreachable.
        """
        self._count(sender)
        if sender.kind is Kind.RUNNER:
            runner_id: str | None = sender.id
        else:
            runner_id = await self.store.app_session_runner(sender.id, req.session_id)
        if runner_id is None:
            raise SessionNotFound
        session, now_ms = await self.store.active_session(runner_id, req.session_id)
        if session is None:
            raise SessionNotFound
        party = session.runner_id if sender.kind is Kind.RUNNER else session.app_id
        if party != sender.id:
            raise SessionNotFound
        return session_message(session, sender.kind, req.request_id, req.data, now_ms)
