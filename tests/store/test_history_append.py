"""append_history.lua through PairingStore.history_calls: one call per stream, records in
order, and the look-back that keeps a session's event once (on every store backend)."""

from __future__ import annotations

from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.store import PairingStore

LIMITS = {"max_len": 1000, "identity_max_len": 100, "retention_s": 3600, "shards": 1}


def _entry(event: str, session_id: str = "s-1", **extra: str) -> PairingHistoryEntry:
    return PairingHistoryEntry(
        event=event, at_ms=0, runner_id="r-1", app_id="a-1", session_id=session_id, **extra
    )


async def _events(store: PairingStore, key: str) -> list[tuple[str, str]]:
    return [
        (fields["event"], fields.get("session_id", ""))
        for _id, fields in await store.client.xrange(key)
    ]


async def test_a_pairs_records_go_to_each_stream_in_one_call(store: PairingStore) -> None:
    entries = [
        _entry("pair.succeeded", code_mask="7**-***-*** #3f9a1c2e"),
        _entry("session.opened"),
    ]
    calls = store.history_calls(entries, **LIMITS)
    assert len(calls) == 3  # global, runner, app
    await store.batch(calls)
    keys = store.keys
    for key in (keys.history_global(0), keys.history("runner", "r-1"), keys.history("app", "a-1")):
        assert await _events(store, key) == [("pair.succeeded", "s-1"), ("session.opened", "s-1")]
        assert 0 < await store.client.pttl(key) <= 3_600_000


async def test_a_sessions_event_is_kept_once_other_records_every_time(store: PairingStore) -> None:
    twice = [_entry("session.opened"), _entry("session.opened")]  # in one call
    await store.batch(store.history_calls(twice, **LIMITS))
    await store.batch(store.history_calls([_entry("session.opened")], **LIMITS))  # another call
    await store.batch(store.history_calls([_entry("session.opened", "s-2")], **LIMITS))
    failed = [_entry("pair.failed"), _entry("pair.failed")]
    await store.batch(store.history_calls(failed, **LIMITS))
    assert await _events(store, store.keys.history("app", "a-1")) == [
        ("session.opened", "s-1"),
        ("session.opened", "s-2"),
        ("pair.failed", "s-1"),
        ("pair.failed", "s-1"),
    ]
