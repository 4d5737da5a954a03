"""services/outbox.render: a pair's one outbox entry goes on the wire as the 3 events of
docs/protocol.md "Events" (session.opened to both parties, code.used to the runner),
with the event ids they always had; an entry written before code.used rode along renders
as before."""

from __future__ import annotations

from mqtt_pairing.models import PairingSession
from mqtt_pairing.services import events
from mqtt_pairing.services.outbox import render
from mqtt_pairing.store.redis_store import OutboxEntry
from mqtt_pairing.topics import Kind

SESSION = PairingSession.model_validate(
    {
        "session_id": "s-1",
        "runner_id": "r-1",
        "app_id": "a-1",
        "created_at_ms": 1_700_000_000_000,
        "last_seen_at_ms": 1_700_000_000_000,
    }
)


def _entry(extra: dict[str, object]) -> OutboxEntry:
    return OutboxEntry("1-0", "r-1", "session.opened", SESSION, extra, SESSION.created_at_ms)


def test_one_entry_renders_the_three_events_of_a_pair() -> None:
    entry = _entry(
        {"app_public_key": "pk", "app_metadata": {"m": 1}, "uses_left": 2, "code_mask": "7**"}
    )
    out = render(entry)
    expected = [
        *events.session_opened(SESSION, app_public_key="pk", app_metadata={"m": 1}),
        events.code_used("r-1", "s-1", 2, SESSION.created_at_ms),
    ]
    assert out == expected
    assert [(e.kind, e.payload["event"]) for e in out] == [
        (Kind.RUNNER, "session.opened"),
        (Kind.APP, "session.opened"),
        (Kind.RUNNER, "code.used"),
    ]
    assert out[2].payload["event_id"] == events.event_id("s-1", "code.used")
    assert all("code_mask" not in e.payload for e in out)  # internal: the history's


def test_an_entry_written_before_renders_session_opened_only() -> None:
    out = render(_entry({"app_public_key": None, "app_metadata": None}))
    assert [e.payload["event"] for e in out] == ["session.opened", "session.opened"]
