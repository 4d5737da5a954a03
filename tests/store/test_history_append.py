"""History writes (PairingStore.history_calls, append_history.lua, open_session.lua,
trim_history.lua), on every store backend: one writer per record (no look-back), a TTL on
identity streams only, the age trim off the request path, and a pair's runner record
written by the open itself, once."""

from __future__ import annotations

import asyncio

from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import OutboxRelay
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.redis_store import RawCall, ScriptCall
from tests.store.helpers import Api, redis_now_ms

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


async def test_records_go_to_each_stream_in_order_in_one_call(store: PairingStore) -> None:
    entries = [_entry("pair.failed", error_code="CODE_NOT_FOUND"), _entry("session.closed")]
    calls = store.history_calls(entries, **LIMITS)
    assert [c.name for c in calls if isinstance(c, ScriptCall)] == ["append_history"] * 3
    await store.batch(calls)
    keys = store.keys
    for key in (keys.history_global(0), keys.history("runner", "r-1"), keys.history("app", "a-1")):
        assert await _events(store, key) == [("pair.failed", "s-1"), ("session.closed", "s-1")]
    for key in (keys.history("runner", "r-1"), keys.history("app", "a-1")):
        assert 0 < await store.client.pttl(key) <= 3_600_000
    # The global shards are trimmed by count and age, and expire never.
    assert await store.client.pttl(keys.history_global(0)) == -1


async def test_a_single_global_record_is_one_plain_xadd(store: PairingStore) -> None:
    calls = store.history_calls([_entry("pair.failed")], streams=("global", "app"), **LIMITS)
    assert isinstance(calls[0], RawCall)
    assert calls[0].args[0] == "XADD"
    assert isinstance(calls[1], ScriptCall)  # the app's, with its TTL
    await store.batch(calls)
    assert await _events(store, store.keys.history_global(0)) == [("pair.failed", "s-1")]
    assert await _events(store, store.keys.history("runner", "r-1")) == []


async def test_every_record_is_kept_no_look_back(store: PairingStore) -> None:
    twice = [_entry("session.closed"), _entry("session.closed")]
    await store.batch(store.history_calls(twice, **LIMITS))
    await store.batch(store.history_calls([_entry("pair.failed")], streams=("app",), **LIMITS))
    assert await _events(store, store.keys.history("app", "a-1")) == [
        ("session.closed", "s-1"),
        ("session.closed", "s-1"),
        ("pair.failed", "s-1"),
    ]
    assert await _events(store, store.keys.history_global(0)) == [
        ("session.closed", "s-1"),
        ("session.closed", "s-1"),
    ]


async def test_the_sweeps_trim_drops_records_older_than_the_retention(
    store: PairingStore,
) -> None:
    key = store.keys.history_global(0)
    await store.batch(store.history_calls([_entry("pair.failed", "old")], **LIMITS))
    await asyncio.sleep(1.1)
    await store.batch(store.history_calls([_entry("pair.failed", "new")], **LIMITS))
    # A retention of 1 s: the first record is past it, the second not (real time).
    assert await store.call(store.trim_history_call(0, retention_s=1)) == 1
    assert await _events(store, key) == [("pair.failed", "new")]


async def test_an_identity_streams_age_trim_on_a_sampled_write(store: PairingStore) -> None:
    key = store.keys.history("app", "a-1")
    await store.batch(store.history_calls([_entry("pair.failed", "old")], **LIMITS))
    await asyncio.sleep(1.1)
    now = await redis_now_ms(store.client)
    limits = {**LIMITS, "retention_s": 1}
    trimmed = []
    for _ in range(200):  # about one write in 16 trims: one in 200 does, all but surely
        calls = store.history_calls(
            [_entry("pair.failed", "new")], streams=("app",), trim_now_ms=now, **limits
        )
        trimmed += [c for c in calls if isinstance(c, ScriptCall) and c.args[2] != ""]
        if trimmed:
            await store.batch(calls)
            break
    assert trimmed
    assert ("pair.failed", "old") not in await _events(store, key)


async def test_a_pair_writes_its_runner_record_in_the_open_once(api: Api) -> None:
    code = await api.code("r1")
    sid = await api.pair_ok("a1", code)
    store = api.store
    # The open again (a retry after a crash before the reply): the same session, and
    # no second record.
    again = await store.open_session(
        runner_id="r1",
        digest="",
        session_id=sid,
        app_id="a1",
        app_name=None,
        idle_ttl_s=3600,
        max_sessions=5,
        code_mask="x",
    )
    assert again.repeat
    assert again.session.session_id == sid
    runner = [f for _i, f in await store.client.xrange(store.keys.history("runner", "r1"))]
    pairs = [f for f in runner if f["event"] == "pair.succeeded"]
    assert len(pairs) == 1
    assert pairs[0]["session_id"] == sid
    assert pairs[0]["app_id"] == "a1"
    assert pairs[0]["code_mask"].startswith(code[0])
    assert "session.opened" not in [f["event"] for f in runner]
    assert await store.client.pttl(store.keys.history("runner", "r1")) > 0


async def test_the_sweep_trims_the_global_shards_about_once_a_minute(api: Api) -> None:
    async def publish(_events: list[Event]) -> None:
        return None

    # A retention of 1 s (below what settings accept: only the model's copy takes it).
    settings = api.settings.model_copy(update={"pairing_history_retention_s": 1})
    relay = OutboxRelay(api.store, settings, publish, api.d.history)
    store = api.store
    key = store.keys.history_global(0)
    await store.batch(store.history_calls([_entry("pair.failed", "old")], **LIMITS))
    await asyncio.sleep(1.1)
    await relay.sweep_once()
    assert await _events(store, key) == []
    await store.batch(store.history_calls([_entry("pair.failed", "later")], **LIMITS))
    await asyncio.sleep(1.1)
    await relay.sweep_once()  # within the minute: not trimmed again yet
    assert await _events(store, key) == [("pair.failed", "later")]
