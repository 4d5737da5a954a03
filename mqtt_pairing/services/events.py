"""Events sent to runners and apps on their `events` topics (docs/protocol.md)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from mqtt_pairing.models import PairingSession, format_ts
from mqtt_pairing.topics import Kind

_EVENT_NS = uuid.UUID("6f1d3c52-8a57-4f7e-9d0b-3f4f6f0c2a11")


def event_id(*parts: str) -> str:
    """A deterministic event id (UUID 5) for what happened, e.g. (session_id, "opened").

    Deterministic so that an event sent again after a retry or redelivery carries the
    same `event_id`, and clients drop the copy (docs/protocol.md: "a client that sees one
    twice drops the copy").
    """
    return str(uuid.uuid5(_EVENT_NS, "\n".join(parts)))


@dataclass(frozen=True, slots=True)
class Event:
    """One event for one party: who receives it and the JSON object to publish."""

    kind: Kind
    id: str
    payload: dict[str, Any]


def session_opened(
    session: PairingSession,
    *,
    app_public_key: str | None,
    app_metadata: dict[str, Any] | None,
) -> list[Event]:
    """`session.opened` to both parties (docs/protocol.md "App pair")."""
    payload = {
        "event": "session.opened",
        "event_id": event_id(session.session_id, "opened"),
        "at": format_ts(session.created_at_ms),
        "session": session.to_wire(),
        "app_public_key": app_public_key,
        "app_metadata": app_metadata,
    }
    return [
        Event(Kind.RUNNER, session.runner_id, payload),
        Event(Kind.APP, session.app_id, payload),
    ]


def session_closed(session: PairingSession) -> list[Event]:
    """`session.closed` to both parties (docs/protocol.md "Session object")."""
    at_ms = session.closed_at_ms if session.closed_at_ms is not None else session.last_seen_at_ms
    payload = {
        "event": "session.closed",
        "event_id": event_id(session.session_id, "closed"),
        "at": format_ts(at_ms),
        "session": session.to_wire(),
    }
    return [
        Event(Kind.RUNNER, session.runner_id, payload),
        Event(Kind.APP, session.app_id, payload),
    ]


def session_message(
    session: PairingSession,
    sender: Kind,
    request_id: str,
    data: dict[str, Any],
    at_ms: int,
) -> Event:
    """`session.message` to the other party (docs/protocol.md "Runner and app message").

    The event id is derived from the session, the sender, its `request_id` and a
    digest of `data` (SHA-256 of its canonical JSON: sorted keys, compact), so a request
    handled twice relays one event as far as the receiver can tell, while a `request_id`
    reused with other data is a new message (docs/protocol.md, "Runner and app message").
    """
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    to = Kind.APP if sender is Kind.RUNNER else Kind.RUNNER
    return Event(
        to,
        session.app_id if to is Kind.APP else session.runner_id,
        {
            "event": "session.message",
            "event_id": event_id(session.session_id, "message", sender.value, request_id, digest),
            "at": format_ts(at_ms),
            "session_id": session.session_id,
            "from": sender.value,
            "data": data,
        },
    )


def code_used(runner_id: str, session_id: str, uses_left: int, at_ms: int) -> Event:
    """`code.used` to the runner after each successful use (docs/protocol.md "Runner code")."""
    return Event(
        Kind.RUNNER,
        runner_id,
        {
            "event": "code.used",
            "event_id": event_id(session_id, "code.used"),
            "at": format_ts(at_ms),
            "uses_left": uses_left,
        },
    )
