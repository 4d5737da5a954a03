"""The marks a pair writes with its open (outbox due mark, idle deadline: mark_open.lua or two
plain ZADDs given a Redis time), and an open given a Redis time read earlier in the
request, on every store backend."""

from __future__ import annotations

from mqtt_pairing.codes import normalise_code
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.redis_store import RawCall, ScriptCall
from tests.store.helpers import Api, redis_now_ms

LEASE_MS, IDLE_S = 5_000, 3_600


def _marks(store: PairingStore, now_ms: int | None = None) -> list[RawCall | ScriptCall]:
    return store.open_marks_calls(
        "r1", "s1", lease_s=LEASE_MS / 1000, idle_ttl_s=IDLE_S, shards=4, now_ms=now_ms
    )


async def _scores(store: PairingStore) -> tuple[float | None, float | None]:
    shard = store.keys.shard_of("r1", 4)
    due = await store.client.zscore(store.keys.outbox_due(shard), "r1")
    deadline = await store.client.zscore(store.keys.expiry(shard), "r1\ns1")
    return due, deadline


async def test_one_script_writes_both_marks_in_the_runners_shard(store: PairingStore) -> None:
    calls = _marks(store)
    assert [c.name for c in calls if isinstance(c, ScriptCall)] == ["mark_open"]
    before = await redis_now_ms(store.client)
    await store.batch(calls)
    after = await redis_now_ms(store.client)
    due, deadline = await _scores(store)
    assert due is not None
    assert deadline is not None
    assert before + LEASE_MS <= due <= after + LEASE_MS
    assert before + IDLE_S * 1000 + LEASE_MS <= deadline <= after + IDLE_S * 1000 + LEASE_MS
    # An earlier due time (another writer's, or 0: due now) is kept; no TTL is set.
    shard = store.keys.shard_of("r1", 4)
    await store.client.zadd(store.keys.outbox_due(shard), {"r1": 0})
    await store.batch(_marks(store))
    assert (await _scores(store))[0] == 0
    assert await store.client.pttl(store.keys.outbox_due(shard)) == -1


async def test_given_a_redis_time_the_marks_are_two_plain_zadds(store: PairingStore) -> None:
    now = await redis_now_ms(store.client)
    calls = _marks(store, now_ms=now)
    assert [type(c) for c in calls] == [RawCall, RawCall]
    await store.batch(calls)
    assert await _scores(store) == (now + LEASE_MS, now + IDLE_S * 1000 + LEASE_MS)
    await store.batch(_marks(store, now_ms=now + 1_000))  # a later mark keeps the earlier
    assert (await _scores(store))[0] == now + LEASE_MS


async def test_the_deadline_is_not_before_last_seen_plus_the_idle_ttl(api: Api) -> None:
    """The marks run before the open in the pair's batch: the deadline still comes after
    the session's last_seen_at + idle TTL (the lease is the margin)."""
    sid = await api.pair_ok("a1", await api.code("r1"))
    store = api.store
    (session,) = await store.runner_sessions("r1", idle_ttl_s=IDLE_S)
    shards = api.settings.pairing_index_shards
    key = store.keys.expiry(store.keys.shard_of("r1", shards))
    deadline = await store.client.zscore(key, f"r1\n{sid}")
    idle_ms = api.settings.pairing_session_idle_ttl_s * 1000
    assert deadline is not None
    assert deadline >= session.created_at_ms + idle_ms


async def test_an_open_given_a_redis_time_uses_it(api: Api) -> None:
    code = await api.code("r1")
    store = api.store
    digest = api.dispatcher.codes.digest(normalise_code(code))
    now = await redis_now_ms(store.client) - 50  # read earlier in the request
    opened = await store.open_session(
        runner_id="r1",
        digest=digest,
        session_id="s-given-time",
        app_id="a1",
        app_name=None,
        idle_ttl_s=IDLE_S,
        max_sessions=5,
        now_ms=now,
    )
    assert opened.session.created_at_ms == now
    assert opened.outbox[0].at_ms == now
