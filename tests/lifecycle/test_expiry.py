"""Session expiry (docs/protocol.md "Session object", docs/design.md "Redis keys": expiry sets).

`test_an_idle_session_expires_in_real_time` lets a session stay idle for its real idle
TTL (a few seconds) on Redis, fakeredis and the cluster: every key keeps the TTL the
service gave it, so a key that would expire before the sweep acts shows. The other tests
move time instead of waiting for it (a session's `last_seen_at_ms` is set past the idle
TTL and its deadline in the expiry set made due): quick, but blind to key TTLs, since the
keys stay young in Redis's eyes (tests/store/test_expiry.py says more).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mqtt_pairing.store.keys import KeySchema
from tests.harness.servers import FakeRedisServer, RedisClusterServers, RedisServer
from tests.lifecycle.conftest import Peers, StartService
from tests.lifecycle.support import (
    Wire,
    backdate_session,
    expiry_key,
    expiry_member,
    history,
    make_expiry_due,
    pair_apps,
    parse_ts,
    redis_now_ms,
    session_json,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

IDLE_TTL_S = 60
IDLE_MS = IDLE_TTL_S * 1000 + 1000  # backdate by this much: idle for longer than the TTL
SWEEP_S = 0.2


NOISE_KEYS = 100_000
_FILL = """
for i = tonumber(ARGV[2]), tonumber(ARGV[3]) do
  redis.call('SET', ARGV[1] .. ':' .. i, 'xxxxxxxxxxxxxxxx', 'PX', 2000 + i % 3000)
end
return 0
"""


def fill_noise(rdb: redis.Redis, prefix: str, count: int) -> None:
    """`count` unrelated keys `prefix:<i>` with TTLs of 2-5 s, in batches of 10k."""
    for start in range(0, count, 10_000):
        rdb.eval(_FILL, 0, prefix, start, min(start + 10_000, count) - 1)


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        "fakeredis",
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[dict[str, str], Any]]:
    """(settings that point the service at the engine, a sync client of it)."""
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        client: Any = cluster.client(decode_responses=True)
        yield {"redis_cluster_url": cluster.url}, client
    else:
        name = "redis_server" if request.param == "redis" else "fakeredis_server"
        server: RedisServer | FakeRedisServer = request.getfixturevalue(name)
        client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=10)
        yield {"redis_url": server.url}, client
    client.close()


def check_expired(event: dict[str, Any], session: dict[str, Any]) -> None:
    assert event["event"] == "session.closed"
    assert event["event_id"]
    parse_ts(event["at"])
    closed = event["session"]
    assert closed["session_id"] == session["session_id"]
    assert closed["runner_id"] == session["runner_id"]
    assert closed["app_id"] == session["app_id"]
    assert closed["state"] == "closed"
    assert closed["closed_reason"] == "expired"


async def test_an_idle_session_expires_in_real_time(
    backend: tuple[dict[str, str], Any],
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    keys: KeySchema,
) -> None:
    """Nothing is backdated: the session stays idle for its 3 s and every key keeps its TTL.

    Both parties hear `session.closed` (`expired`), not before the deadline and within a
    minute of it (docs/protocol.md), and the history records the close.
    """
    engine, client = backend
    idle_s = 3
    await start_service(pairing_session_idle_ttl_s=idle_s, **engine)
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        (session,) = await pair_apps(runner, a1)
        sid = session["session_id"]
        (to_runner,) = await wire.wait_events("runner", "r1", "session.closed", timeout_s=60)
        (to_app,) = await wire.wait_events("app", "a1", "session.closed", timeout_s=5)
        check_expired(to_runner, session)
        assert to_app == to_runner
        idle_for = parse_ts(to_app["at"]) - parse_ts(session["last_seen_at"])
        assert idle_for.total_seconds() >= idle_s, idle_for

        assert await runner.sessions() == []
        assert await a1.sessions() == []
        for kind, ident in (("runner", "r1"), ("app", "a1")):
            records = [f for _, f in client.xrange(keys.history(kind, ident))]
            closed = [f for f in records if f["event"] == "session.closed"]
            assert [(f["session_id"], f.get("detail")) for f in closed] == [
                (sid, "closed_reason=expired")
            ]


async def test_idle_session_expires_and_both_parties_hear_it(
    start_service: StartService, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    await start_service(pairing_session_idle_ttl_s=IDLE_TTL_S)
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        (session,) = await pair_apps(runner, a1)
        sid = session["session_id"]
        # Fresh: its deadline is last_seen_at + the idle TTL + the outbox lease (written
        # just before the open in its batch, the lease its margin; never earlier).
        stored = session_json(rdb, keys, "r1", sid)
        score = rdb.zscore(expiry_key(keys, "r1"), expiry_member("r1", sid))
        margin = score - (stored["last_seen_at_ms"] + IDLE_TTL_S * 1000)
        assert 0 <= margin <= 5_000, score

        backdate_session(rdb, keys, "r1", sid, IDLE_MS)
        await asyncio.sleep(SWEEP_S * 2)
        assert wire.events("app", "a1", "session.closed") == [], "expired before its deadline"
        make_expiry_due(rdb, keys, "r1", sid)

        (to_runner,) = await wire.wait_events("runner", "r1", "session.closed", timeout_s=10)
        (to_app,) = await wire.wait_events("app", "a1", "session.closed", timeout_s=10)
        check_expired(to_runner, session)
        assert to_app == to_runner
        await asyncio.sleep(SWEEP_S * 3)
        assert len(wire.events("app", "a1", "session.closed")) == 1
        assert len(wire.events("runner", "r1", "session.closed")) == 1

        assert await runner.sessions() == []
        assert await a1.sessions() == []
        assert await a1.status() == {"paired": False, "runners": []}
        assert rdb.zscore(expiry_key(keys, "r1"), expiry_member("r1", sid)) is None
        assert rdb.exists(keys.session(sid)) == 0
        assert rdb.hget(keys.app_sessions("a1"), sid) is None
        records = [f for _, f in history(rdb, keys.history("runner", "r1"))]
        closed = [f for f in records if f["event"] == "session.closed"]
        assert [(f["session_id"], f.get("detail")) for f in closed] == [
            (sid, "closed_reason=expired")
        ]


async def test_sessions_with_traffic_do_not_expire(
    start_service: StartService, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    """Every kind of traffic refreshes: app sessions, app status, runner sessions, heartbeat.

    r1 has two sessions: a1 lists its own (refreshing only that one), a2 stays idle.
    """
    await start_service(pairing_session_idle_ttl_s=IDLE_TTL_S)
    async with (
        peers.runner("r1") as r1,
        peers.runner("r2") as r2,
        peers.runner("r3") as r3,
        peers.runner("r4") as r4,
        peers.app("a1") as a1,
        peers.app("a2") as a2,
        peers.app("a3") as a3,
        peers.app("a4") as a4,
        peers.app("a5") as a5,
    ):
        s1, s2 = await pair_apps(r1, a1, a2)
        (s3,) = await pair_apps(r2, a3)
        (s4,) = await pair_apps(r3, a4)
        (s5,) = await pair_apps(r4, a5)
        sessions = {"a1": s1, "a2": s2, "a3": s3, "a4": s4, "a5": s5}
        for s in sessions.values():
            backdate_session(rdb, keys, s["runner_id"], s["session_id"], IDLE_MS)

        assert [s["session_id"] for s in await a1.sessions()] == [s1["session_id"]]
        await r2.heartbeat()
        assert [s["session_id"] for s in await r3.sessions()] == [s4["session_id"]]
        assert (await a5.status())["runners"][0]["session_id"] == s5["session_id"]
        now = redis_now_ms(rdb)
        await wait_until(
            lambda: session_json(rdb, keys, "r2", s3["session_id"])["last_seen_at_ms"] > now - 5000,
            10,
            "the heartbeat to refresh r2's session",
        )
        for s in sessions.values():
            make_expiry_due(rdb, keys, s["runner_id"], s["session_id"])

        (closed,) = await wire.wait_events("app", "a2", "session.closed", timeout_s=10)
        check_expired(closed, s2)
        await asyncio.sleep(SWEEP_S * 3)
        everything_closed = [
            e["session"]["session_id"] for e in wire.all_events() if e["event"] == "session.closed"
        ]
        assert everything_closed == [s2["session_id"]] * 2  # to r1 and to a2

        for app, s in ((a1, s1), (a3, s3), (a4, s4), (a5, s5)):
            assert [x["session_id"] for x in await app.sessions()] == [s["session_id"]]
            # The sweep found it alive and moved its deadline to last_seen_at + the TTL.
            stored = session_json(rdb, keys, s["runner_id"], s["session_id"])
            score = rdb.zscore(
                expiry_key(keys, s["runner_id"]), expiry_member(s["runner_id"], s["session_id"])
            )
            assert score is not None
            assert score >= stored["last_seen_at_ms"] + IDLE_TTL_S * 1000 - 5000
            assert score > redis_now_ms(rdb) + (IDLE_TTL_S - 10) * 1000
        assert await a2.sessions() == []
        assert [s["session_id"] for s in await r1.sessions()] == [s1["session_id"]]


async def test_session_kept_alive_by_runner_traffic_stays_visible_to_the_app(
    start_service: StartService, peers: Peers, rdb: redis.Redis, keys: KeySchema
) -> None:
    """The runner heartbeats for longer than the idle TTL while the app is away (a phone
    switched off): the session never expires, so the app must still find it.

    Time is moved to the session's idle deadline: its expiry entry comes due while runner
    traffic has kept `last_seen_at` fresh, and the app-side keys (the app's index and the
    by-id lookup, other slots with plain TTLs) are left with 2 s, less than the session
    has. The sweep must find the session alive and keep those keys alive as long.
    """
    await start_service(pairing_session_idle_ttl_s=IDLE_TTL_S)
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        (session,) = await pair_apps(runner, a1)
        sid = session["session_id"]
        app_keys = (keys.app_sessions("a1"), keys.session(sid))
        for key in app_keys:
            assert rdb.pttl(key) > (IDLE_TTL_S - 5) * 1000
        await runner.heartbeat()  # traffic that refreshes the session (docs/protocol.md)
        for key in app_keys:
            rdb.pexpire(key, 2000)
        make_expiry_due(rdb, keys, "r1", sid)

        await wait_until(
            lambda: all(rdb.pttl(key) > IDLE_TTL_S * 1000 for key in app_keys),
            10,
            "the sweep to keep the app-side keys of a live session alive",
        )
        deadline = rdb.zscore(expiry_key(keys, "r1"), expiry_member("r1", sid))
        assert deadline is not None
        assert deadline > redis_now_ms(rdb) + (IDLE_TTL_S - 10) * 1000
        assert [s["session_id"] for s in await runner.sessions()] == [sid]
        assert [s["session_id"] for s in await a1.sessions()] == [sid]
        assert (await a1.status())["paired"] is True
        assert await a1.unpair(sid) == 1


async def test_unrelated_keys_with_ttls_do_not_delay_expiry(
    start_service: StartService, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    """100k keys with TTLs, expiring during the test, do not keep the sweep from acting."""
    sweep_s = 0.5
    await start_service(pairing_session_idle_ttl_s=IDLE_TTL_S, pairing_sweep_interval_s=sweep_s)
    noise = f"lc-noise-{uuid.uuid4().hex[:8]}"
    names = [f"{noise}:{i}" for i in range(NOISE_KEYS)]
    try:
        async with peers.runner("r1") as runner, peers.app("a1") as a1:
            (session,) = await pair_apps(runner, a1)
            sid = session["session_id"]
            backdate_session(rdb, keys, "r1", sid, IDLE_MS)
            # They expire from 2 s from now over the next 3 s, while the sweep runs. (A
            # script writes them: a redis-py pipeline needs ~7 s for 100k on this machine.)
            started = time.monotonic()
            await asyncio.to_thread(fill_noise, rdb, noise, len(names))
            assert rdb.dbsize() >= NOISE_KEYS // 2
            # Let them start expiring (Redis's active expiry cycle is busy from now on).
            await asyncio.sleep(max(0.0, 2.3 - (time.monotonic() - started)))

            make_expiry_due(rdb, keys, "r1", sid)
            # Within the minute docs/protocol.md allows; how fast is for benchmarks/.
            await wire.wait_events("app", "a1", "session.closed", timeout_s=60)
            await wire.wait_events("runner", "r1", "session.closed", timeout_s=60)
            check_expired(wire.events("app", "a1", "session.closed")[0], session)
    finally:
        pipe = rdb.pipeline(transaction=False)
        for i in range(0, len(names), 5000):
            pipe.unlink(*names[i : i + 5000])
        pipe.execute()
