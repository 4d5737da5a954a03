"""Session expiry against real key TTLs (docs/protocol.md "Session object").

An idle session is closed by the expiry sweep at its deadline (`last_seen_at` + the idle
TTL): it reads the session from the runner's sessions hash, closes it with
`closed_reason: "expired"`, and the outbox tells both parties. Every key the sweep reads
must still exist then, so none may have a TTL that ends at the deadline itself.

Why the lifecycle test that backdates `last_seen_at_ms` could not see a key expiring too
early: it moves the session's clock, not Redis's. The keys keep the TTLs they were given
at the open, so from Redis's point of view the session is a few seconds old when the sweep
closes it, and a key whose TTL equals the idle TTL is nowhere near its end. Only a session
that really stays idle for its idle TTL, or a check of the keys' TTLs against the
deadline, shows it; these tests do both.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import OutboxRelay
from mqtt_pairing.store import PairingStore
from mqtt_pairing.topics import Kind
from tests.store.helpers import Api, redis_now_ms

LATE_SWEEP_MS = 3_600_000
"""How late the sweep may run (every instance down for an hour) and still find the keys."""


async def _deadline(store: PairingStore, runner_id: str, session_id: str) -> int:
    raw = await store.client.hget(store.keys.runner_sessions(runner_id), session_id)
    assert raw is not None, "the session is not open"
    return int(json.loads(raw)["last_seen_at_ms"])


async def _short_lived(store: PairingStore, keys: list[str], deadline_ms: int) -> list[str]:
    """Keys of `keys` that are gone, or would be gone before the sweep may act."""
    now = await redis_now_ms(store.client)
    short = []
    for key in keys:
        pttl = int(await store.client.pttl(key))
        if pttl == -2 or (pttl >= 0 and now + pttl < deadline_ms + LATE_SWEEP_MS):
            short.append(f"{key} (pttl {pttl} ms, deadline in {deadline_ms - now} ms)")
    return short


async def test_the_keys_the_sweep_reads_outlive_the_idle_deadline(
    make_api: Any, store: PairingStore
) -> None:
    idle_s = 600
    api: Api = make_api(pairing_session_idle_ttl_s=idle_s)
    code = await api.code("r1", max_uses=2)
    sid = await api.pair_ok("a1", code)
    k = store.keys
    swept = [k.runner_sessions("r1"), k.runner("r1"), k.app_sessions("a1"), k.session(sid)]

    deadline = await _deadline(store, "r1", sid) + idle_s * 1000
    assert await _short_lived(store, swept, deadline) == []

    # Traffic moves the deadline; every key must follow it.
    await api.handle(Kind.RUNNER, "r1", "heartbeat", {})
    deadline = await _deadline(store, "r1", sid) + idle_s * 1000
    assert await _short_lived(store, swept, deadline) == []
    assert (await api.request(Kind.APP, "a1", "sessions"))["ok"]
    deadline = await _deadline(store, "r1", sid) + idle_s * 1000
    assert await _short_lived(store, swept, deadline) == []

    # The sweep finding it alive (its deadline moved by traffic) keeps the others alive.
    shards = api.settings.pairing_index_shards
    found = await store.expire_session("r1", sid, idle_ttl_s=idle_s, shards=shards)
    assert found == (None, [])
    assert await _short_lived(store, swept, deadline) == []


async def test_an_idle_session_closes_at_its_deadline_in_real_time(
    make_api: Any, store: PairingStore
) -> None:
    """Nothing backdated: the session stays idle for its 2 s, the keys' TTLs run for real."""
    idle_s = 2
    api: Api = make_api(pairing_session_idle_ttl_s=idle_s)
    published: list[Event] = []

    async def publish(events: list[Event]) -> None:
        published.extend(events)

    relay = OutboxRelay(store, api.settings, publish, api.d.history)
    code = await api.code("r1")
    sid = await api.pair_ok("a1", code)
    last_seen = await _deadline(store, "r1", sid)

    def closed() -> list[dict[str, Any]]:
        return [e.payload for e in published if e.payload["event"] == "session.closed"]

    loop = asyncio.get_running_loop()
    give_up = loop.time() + idle_s + 30
    while len(closed()) < 2:
        assert loop.time() < give_up, f"no session.closed; published: {published}"
        await relay.sweep_once()
        await asyncio.sleep(0.1)

    to_runner, to_app = (
        [e for e in published if e.kind is kind and e.payload["event"] == "session.closed"]
        for kind in (Kind.RUNNER, Kind.APP)
    )
    assert [e.id for e in to_runner] == ["r1"]
    assert [e.id for e in to_app] == ["a1"]
    session = to_app[0].payload["session"]
    assert session["session_id"] == sid
    assert session["closed_reason"] == "expired"
    assert to_runner[0].payload == to_app[0].payload
    # not before its deadline (Redis time: the sweep's clock; `at` is closed_at)
    at = datetime.strptime(to_app[0].payload["at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    closed_ms = round(at.replace(tzinfo=UTC).timestamp() * 1000)
    assert closed_ms >= last_seen + idle_s * 1000

    history = await store.client.xrange(store.keys.history("runner", "r1"))
    records = [f for _, f in history if f["event"] == "session.closed"]
    assert [(f["session_id"], f["detail"]) for f in records] == [(sid, "closed_reason=expired")]
    assert await store.client.hget(store.keys.app_sessions("a1"), sid) is None
    assert await store.client.exists(store.keys.session(sid)) == 0
    assert (await api.request(Kind.APP, "a1", "sessions"))["result"]["sessions"] == []
