"""What handling one request produced: the reply, the events, and how to finish it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import render
from mqtt_pairing.store.redis_store import Call, OutboxEntry


@dataclass(slots=True)
class Handled:
    """The result of one op.

    Attributes:
        reply: the reply envelope (None: no reply, e.g. a heartbeat).
        outbox: outbox entries the op's scripts wrote, to publish and then delete.
        history: audit records to append.
        outcome: for `pair`, whether it was a failed guess or a success.
        remember: whether the dispatcher still has to remember the reply (False when the
            op already stored it, as `code` does, sealed, and `pair`).
        outbox_marked: the outbox's due mark is already written (with the lease).
        after: Redis calls that finish the op once its reply is out (a pair's: remember
            the reply, settle the claim, history, ...). Whoever publishes the reply and
            events runs them in the round trip that deletes the outbox entries
            (`OutboxRelay.deliver`), or on their own when there are none.
        recorded: outbox entry types whose history records `after` writes.
        relay: events published straight away, never stored (`session.message`).
    """

    reply: dict[str, Any] | None
    outbox: list[OutboxEntry] = field(default_factory=list)
    history: list[PairingHistoryEntry] = field(default_factory=list)
    outcome: Literal["", "failure", "success"] = ""
    remember: bool = True
    outbox_marked: bool = False
    after: list[Call] = field(default_factory=list)
    recorded: frozenset[str] = frozenset()
    relay: list[Event] = field(default_factory=list)

    @property
    def events(self) -> list[Event]:
        """The wire events: those of the outbox entries, then the relayed ones."""
        return [event for entry in self.outbox for event in render(entry)] + self.relay
