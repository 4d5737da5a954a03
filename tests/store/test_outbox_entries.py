"""What a script hands its caller to publish: the outbox entries it wrote itself.

docs/design.md "Delivery": requests of one runner that run at once share its outbox
stream, and each publishes (then deletes by id) only what its own script wrote, so that
an event goes out once when nothing fails; entries left by an instance that died are the
sweep's. A close also hands over the unpublished `session.opened` of the sessions it
closes, before its own `session.closed`, so that nobody hears of a close before the open.
Here the entries are never published (no relay), so the outbox keeps every entry and the
tests see exactly what each request would have published.
"""

from __future__ import annotations

import asyncio

from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.store.keys import SESSION_KEYS_MARGIN_S
from mqtt_pairing.store.redis_store import OutboxEntry
from mqtt_pairing.topics import Kind
from tests.store.helpers import Api, new_id


def _kinds(entries: list[OutboxEntry]) -> list[tuple[str, str | None]]:
    return [(e.type, e.session.session_id if e.session else None) for e in entries]


async def _pair(api: Api, app_id: str, code: str) -> tuple[str, Handled]:
    handled = await api.handle(Kind.APP, app_id, "pair", {"request_id": new_id(), "code": code})
    assert handled.reply is not None
    assert handled.reply["ok"], handled.reply
    return handled.reply["result"]["session"]["session_id"], handled


async def test_each_request_gets_the_entries_its_own_script_wrote(api: Api) -> None:
    code = await api.code("r1", max_uses=3)
    first, one = await _pair(api, "a1", code)
    second, two = await _pair(api, "a2", code)
    # The second pair's script ran with the first's entries still in the outbox.
    # One entry per pair: session.opened, carrying what code.used needs (the relay
    # renders it as both events, services/outbox.py).
    assert _kinds(one.outbox) == [("session.opened", first)]
    assert _kinds(two.outbox) == [("session.opened", second)]
    assert (one.outbox[0].extra["uses_left"], two.outbox[0].extra["uses_left"]) == (2, 1)
    stored = await api.store.read_outbox("r1")
    assert [e.stream_id for e in stored] == [e.stream_id for e in [*one.outbox, *two.outbox]]
    assert stored == [*one.outbox, *two.outbox]  # the same entries, field for field

    # Closing the first session: its unpublished session.opened first, then the close;
    # nothing of the second session.
    unpair = await api.handle(
        Kind.RUNNER, "r1", "unpair", {"request_id": new_id(), "session_id": first}
    )
    assert _kinds(unpair.outbox) == [("session.opened", first), ("session.closed", first)]
    assert unpair.outbox[0] == one.outbox[0]

    # A presence change hands over its own announcement only.
    await api.store.record_status(
        "r1", "online", retained=False, heartbeat_online_s=30, idle_ttl_s=3600
    )
    offline = await api.store.record_status(
        "r1", "offline", retained=False, heartbeat_online_s=30, idle_ttl_s=3600
    )
    assert [e.type for e in offline] == ["runner.offline"]
    assert offline[0].extra["sessions"] == [[second, "a2"]]
    back = await api.store.heartbeat("r1", idle_ttl_s=3600, heartbeat_online_s=30)
    assert [e.type for e in back] == ["runner.online"]
    assert await api.store.heartbeat("r1", idle_ttl_s=3600, heartbeat_online_s=30) == []

    # A repeat of the second pair (a retry after a crash) hands over nothing: what its
    # first attempt wrote is that attempt's to publish, or the sweep's.
    opened = await api.store.open_session(
        runner_id="r1",
        digest=api.digest(code),
        session_id=second,
        app_id="a2",
        app_name=None,
        idle_ttl_s=3600,
        max_sessions=10,
    )
    assert opened.repeat
    assert opened.outbox == []


async def test_a_heartbeat_right_after_an_offline_status_makes_the_runner_online(
    api: Api,
) -> None:
    """Back to back, the two often share a Redis millisecond: the heartbeat, processed
    later, still wins (an offline status wins a tie only against an earlier heartbeat)."""
    code = await api.code("r1")
    await _pair(api, "a1", code)
    await api.store.record_status(
        "r1", "online", retained=False, heartbeat_online_s=30, idle_ttl_s=3600
    )
    unbounded = 1_000  # announcements per window: every flip is announced here
    for _ in range(40):
        offline = await api.store.record_status(
            "r1",
            "offline",
            retained=False,
            heartbeat_online_s=30,
            idle_ttl_s=3600,
            announce_max=unbounded,
        )
        assert [e.type for e in offline] == ["runner.offline"]
        back = await api.store.heartbeat(
            "r1", idle_ttl_s=3600, heartbeat_online_s=30, announce_max=unbounded
        )
        assert [e.type for e in back] == ["runner.online"]


async def test_a_heartbeat_renews_the_runner_keys_ttls_only_now_and_then(api: Api) -> None:
    """The keys' TTLs are renewed when no heartbeat did for `renew_ms` (real 300 ms here):
    in between, a beat writes its time and the sessions' last_seen_at only."""
    code = await api.code("r1")
    await _pair(api, "a1", code)
    store, ttl_ms = api.store, (3600 + SESSION_KEYS_MARGIN_S) * 1000
    keys = (store.keys.runner("r1"), store.keys.runner_sessions("r1"))
    await store.heartbeat("r1", idle_ttl_s=3600, heartbeat_online_s=30, renew_ms=300)
    first = [await store.client.pttl(k) for k in keys]
    assert all(ttl_ms - 1_000 < t <= ttl_ms for t in first)
    await asyncio.sleep(0.1)
    await store.heartbeat("r1", idle_ttl_s=3600, heartbeat_online_s=30, renew_ms=300)
    second = [await store.client.pttl(k) for k in keys]
    assert all(0 < t <= f - 90 for t, f in zip(second, first, strict=True))
    await asyncio.sleep(0.25)
    await store.heartbeat("r1", idle_ttl_s=3600, heartbeat_online_s=30, renew_ms=300)
    third = [await store.client.pttl(k) for k in keys]
    assert all(ttl_ms - 50 < t <= ttl_ms for t in third)
