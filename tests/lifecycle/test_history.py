"""History (docs/design.md "Redis keys": history streams; docs/protocol.md "Codes": masking).

Every kind of record, through the running service; masking; trimming by count
(`XADD MAXLEN ~` trims whole stream nodes, so only an upper bound is exact) and by age;
idle expiry of per-identity streams; paging through more than 10k entries.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest
import redis

from mqtt_pairing.admin import AdminService
from mqtt_pairing.client import ReplyError
from mqtt_pairing.config import Settings, load_settings
from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.services.history import HISTORY_EVENTS, PairingHistoryService
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from tests.harness.servers import RedisServer
from tests.lifecycle.conftest import Peers, StartService
from tests.lifecycle.support import MASK_RE, Wire, history, redis_now_ms, wait_until

pytestmark = pytest.mark.timeout(60)

NODE = 100  # stream-node-max-entries (Redis default): the granularity of `~` trimming


def mask_of(code: str) -> re.Pattern[str]:
    """The masked form of `code`: its first character, the rest hidden, a fingerprint."""
    return re.compile(rf"^{re.escape(code[0])}\*\*-\*\*\*-\*\*\* #[0-9a-f]{{8}}$")


def code_forms(code: str) -> list[str]:
    """Ways a code could leak: as shown, without dashes, lower case."""
    bare = code.replace("-", "")
    return [code, bare, bare.lower(), bare[1:]]


async def test_every_kind_of_record_masked(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    rdb: redis.Redis,
    keys: KeySchema,
) -> None:
    svc = await start_service(pairing_fail_limit=2)
    admin = AdminService(svc.service.store, svc.service.settings, actor="lc-test")
    async with (
        peers.runner("r1") as runner,
        peers.app("a1") as a1,
        peers.app("guesser") as guesser,
    ):
        first = (await runner.request_code())["code"]
        assert await runner.cancel_code() is True
        second = (await runner.request_code())["code"]
        wrong = "ZZZ-ZZZ-ZZ" + ("Y" if second[-1] != "Y" else "X")
        for guess, error in ((first, "CODE_ALREADY_USED"), (wrong, "CODE_NOT_FOUND")):
            with pytest.raises(ReplyError) as caught:
                await guesser.pair(guess)
            assert caught.value.code == error
        with pytest.raises(ReplyError) as caught:
            await guesser.pair(second)
        assert caught.value.code == "RATE_LIMITED"  # the penalty of the second failure
        sid = (await a1.pair(second))["session"]["session_id"]
        # Unpair only once the pair's events are out of the outbox (see the test below).
        await wait_until(lambda: rdb.exists(keys.outbox("r1")) == 0, 5, "the outbox drained")
        assert await a1.unpair(sid) == 1
        await wire.wait_events("runner", "r1", "session.closed")
    # Admin actions (the admin CLI's service layer).
    await admin.add_ban("app", "banned", duration_s=600, reason="lc")
    assert await admin.remove_ban("app", "banned") == (True, False)
    assert await admin.set_allowed("app", "trusted", True)
    assert await admin.set_allowed("app", "trusted", False)

    global_key = keys.history_global(0)
    wanted = {
        "code.issued",
        "code.cancelled",
        "pair.succeeded",
        "pair.failed",
        "penalty",
        "ban.added",
        "ban.removed",
        "allow.added",
        "allow.removed",
        "session.closed",
    }
    # session.opened is no longer written (a pair's pair.succeeded is the open); kept in
    # HISTORY_EVENTS for the records written before.
    new_kinds = set(HISTORY_EVENTS) - {"session.opened"} - wanted
    assert not new_kinds, "a new kind of history record: exercise it here"
    await wait_until(
        lambda: wanted <= {f["event"] for _, f in history(rdb, global_key)},
        5,
        f"history records of {sorted(wanted)}",
    )
    await asyncio.sleep(0.3)
    records = [f for _, f in history(rdb, global_key)]
    by_event: dict[str, list[dict[str, str]]] = {}
    for f in records:
        by_event.setdefault(f["event"], []).append(f)

    issued = by_event["code.issued"]
    assert [f["runner_id"] for f in issued] == ["r1", "r1"]
    assert mask_of(first).match(issued[0]["code_mask"])
    assert mask_of(second).match(issued[1]["code_mask"])
    assert [f["runner_id"] for f in by_event["code.cancelled"]] == ["r1"]

    failed = by_event["pair.failed"]
    assert [(f["app_id"], f["error_code"]) for f in failed] == [
        ("guesser", "CODE_ALREADY_USED"),
        ("guesser", "CODE_NOT_FOUND"),
    ]
    assert mask_of(first).match(failed[0]["code_mask"])
    assert mask_of(wrong).match(failed[1]["code_mask"])
    # The same code has the same fingerprint wherever it is shown.
    assert failed[0]["code_mask"] == issued[0]["code_mask"]
    (penalty,) = by_event["penalty"]
    assert penalty["app_id"] == "guesser"
    assert penalty["detail"] == "retry_after_s=300"

    (succeeded,) = by_event["pair.succeeded"]
    assert (succeeded["app_id"], succeeded["runner_id"], succeeded["session_id"]) == (
        "a1",
        "r1",
        sid,
    )
    assert succeeded["code_mask"] == issued[1]["code_mask"]
    assert "session.opened" not in by_event
    (closed,) = by_event["session.closed"]
    for f in (closed,):
        assert (f["app_id"], f["runner_id"], f["session_id"]) == ("a1", "r1", sid)
    assert closed["detail"] == "closed_reason=unpaired_by_app"
    assert [(f["event"], f["app_id"]) for f in records if f["event"].startswith("ban.")] == [
        ("ban.added", "banned"),
        ("ban.removed", "banned"),
    ]
    assert [f["event"] for f in records if f.get("app_id") == "trusted"] == [
        "allow.added",
        "allow.removed",
    ]

    # Masks only: no form of any code appears in any record of any stream.
    streams = [
        global_key,
        keys.history("runner", "r1"),
        keys.history("app", "a1"),
        keys.history("app", "guesser"),
        keys.history("app", "banned"),
        keys.history("app", "trusted"),
    ]
    for key in streams:
        for _, f in history(rdb, key):
            text = " ".join(f"{k}={v}" for k, v in f.items())
            for code in (first, second, wrong):
                for form in code_forms(code):
                    assert form not in text, f"{key}: {text}"
            if "code_mask" in f:
                assert MASK_RE.match(f["code_mask"]), f

    # Per identity: each stream holds that identity's records, in order.
    def events_of(key: str) -> list[str]:
        return [f["event"] for _, f in history(rdb, key)]

    runner_events = events_of(keys.history("runner", "r1"))
    for name in ("code.issued", "code.cancelled", "pair.succeeded"):
        assert name in runner_events
    assert runner_events.count("pair.succeeded") == 1
    assert runner_events.index("pair.succeeded") < runner_events.index("session.closed")
    assert runner_events.index("code.cancelled") < runner_events.index("pair.succeeded")
    assert events_of(keys.history("app", "a1")) == ["pair.succeeded", "session.closed"]
    assert events_of(keys.history("app", "guesser")) == [
        "pair.failed",
        "pair.failed",
        "penalty",
    ]
    # Identity streams expire when idle for the retention (refreshed on write); the
    # global shards are trimmed by count and by age instead (docs/design.md "History").
    retention_ms = 30 * 86_400 * 1000
    for key in streams[1:]:
        assert retention_ms - 60_000 < rdb.pttl(key) <= retention_ms, key
    assert rdb.pttl(global_key) == -1


async def test_overlapping_deliveries_record_each_event_once(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    rdb: redis.Redis,
    keys: KeySchema,
) -> None:
    """The app unpairs while the events of its pair are still being published (a slow
    broker); the pair and the close are still recorded once each (the close hands the
    pair's entry over, and leaves its record to the pair)."""
    svc = await start_service()
    relay = svc.service.gateway.relay
    deliver = relay.deliver
    gate = asyncio.Event()
    calls = 0

    async def slow_first_deliver(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        await deliver(*args, **kwargs)

    relay.deliver = slow_first_deliver  # type: ignore[method-assign]
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        code = (await runner.request_code())["code"]
        sid = (await a1.pair(code))["session"]["session_id"]
        assert await a1.unpair(sid) == 1
        await wire.wait_events("app", "a1", "session.closed")
        gate.set()
        await wait_until(lambda: rdb.exists(keys.outbox("r1")) == 0, 5, "the outbox drained")
        await asyncio.sleep(0.3)
    # On the wire a copy is allowed (same event_id; clients drop it) ...
    opened = wire.events("app", "a1", "session.opened")
    assert {e["event_id"] for e in opened} == {opened[0]["event_id"]}
    # ... but the audit trail must say once what happened once.
    for key in (keys.history_global(0), keys.history("runner", "r1"), keys.history("app", "a1")):
        kinds = [f["event"] for _, f in history(rdb, key)]
        kinds = [k for k in kinds if k in ("pair.succeeded", "session.opened", "session.closed")]
        assert sorted(kinds) == ["pair.succeeded", "session.closed"], (key, kinds)


# ---- trimming and paging, through PairingHistoryService ------------------------------------


@pytest.fixture
async def store(redis_server: RedisServer, keys: KeySchema) -> AsyncIterator[PairingStore]:
    s = PairingStore(connect_redis(redis_server.url, timeout_s=5), keys)
    yield s
    await s.aclose()


def history_settings(lc_prefix: str, **overrides: object) -> Settings:
    return load_settings(pairing_key_prefix=lc_prefix, **overrides)


def record(n: int, runner_id: str = "r1") -> PairingHistoryEntry:
    return PairingHistoryEntry(
        event="code.cancelled", at_ms=0, runner_id=runner_id, detail=f"n={n}"
    )


def numbers(rdb: redis.Redis, key: str) -> list[int]:
    return [int(f["detail"].removeprefix("n=")) for _, f in history(rdb, key)]


async def write(service: PairingHistoryService, start: int, stop: int, batch: int = 500) -> None:
    for low in range(start, stop, batch):
        await service.record([record(n) for n in range(low, min(low + batch, stop))])


async def test_trimmed_by_count(
    store: PairingStore, rdb: redis.Redis, keys: KeySchema, lc_prefix: str
) -> None:
    settings = history_settings(
        lc_prefix, pairing_history_max_len=100, pairing_history_identity_max_len=10
    )
    service = PairingHistoryService(store, settings)
    total = 2_000
    await write(service, 0, total, batch=50)

    for key, max_len in ((keys.history("runner", "r1"), 10), (keys.history_global(0), 100)):
        kept = numbers(rdb, key)
        # Approximate trimming: at least max_len, at most one stream node more.
        assert max_len <= len(kept) <= max_len + NODE, (key, len(kept))
        # What is kept is the newest records, without a gap.
        assert kept == list(range(total - len(kept), total))


async def test_trimmed_by_age_off_the_request_path(
    store: PairingStore, rdb: redis.Redis, keys: KeySchema, lc_prefix: str
) -> None:
    """A write trims by count only; records past the retention are never shown (admin),
    and go from the global shard with the sweep's trim and from an identity's stream on a
    sampled write (docs/design.md "History")."""
    retention_s = 60
    settings = history_settings(lc_prefix, pairing_history_retention_s=retention_s)
    service = PairingHistoryService(store, settings)
    now = redis_now_ms(rdb)
    old_ids = [f"{now - 3_600_000 + i}-0" for i in range(5)]  # an hour old
    recent_id = f"{now - (retention_s - 10) * 1000}-0"  # 50 s old: within the retention
    runner_key = keys.history("runner", "r1")
    for key in (runner_key, keys.history_global(0)):
        for stream_id in [*old_ids, recent_id]:
            rdb.xadd(key, {"event": "code.cancelled", "runner_id": "r1"}, id=stream_id)

    await service.record([record(1)])
    assert len(history(rdb, runner_key)) == 7  # nothing trimmed by age on the write
    admin = AdminService(store, settings)
    for query in ({"runner_id": "r1"}, {}):
        page = await admin.history(**query, limit=100)  # type: ignore[arg-type]
        assert [r.stream_id for r in page.records][-1] == recent_id, query
        assert len(page.records) == 2, query

    await store.call(store.trim_history_call(0, retention_s=retention_s))  # the sweep's
    for _ in range(400):  # about one write in 16 with a Redis time trims
        calls = service.calls([record(2)], now_ms=redis_now_ms(rdb))
        await store.batch(calls)
        if old_ids[0] not in [i for i, _ in history(rdb, runner_key)]:
            break
    cutoff = redis_now_ms(rdb) - retention_s * 1000
    for key in (runner_key, keys.history_global(0)):
        ids = [i for i, _ in history(rdb, key)]
        assert recent_id in ids
        assert all(int(i.split("-")[0]) >= cutoff for i in ids), (key, ids)
    assert 0 < rdb.pttl(runner_key) <= retention_s * 1000  # idle identity streams expire


async def test_paging_through_more_than_10k_entries(
    store: PairingStore, rdb: redis.Redis, keys: KeySchema, lc_prefix: str
) -> None:
    """XREVRANGE pages with exclusive cursors: no duplicate, no gap, even while written to."""
    settings = history_settings(lc_prefix, pairing_history_identity_max_len=20_000)
    service = PairingHistoryService(store, settings)
    total = 10_500
    await write(service, 0, total)
    key = keys.history("runner", "r1")
    assert rdb.xlen(key) == total

    ((top, _),) = rdb.xrevrange(key, "+", "-", count=1)
    writer = asyncio.create_task(write(service, total, total + 600, batch=20))
    seen_ids: list[str] = []
    seen_numbers: list[int] = []
    cursor, page_size, pages = top, 700, 0
    while True:
        page = rdb.xrevrange(key, cursor, "-", count=page_size)
        await asyncio.sleep(0)  # let the writer in between pages
        if not page:
            break
        pages += 1
        for stream_id, fields in page:
            seen_ids.append(stream_id)
            seen_numbers.append(int(fields["detail"].removeprefix("n=")))
        cursor = f"({page[-1][0]}"
    await asyncio.wait_for(writer, 30)

    assert pages == -(-total // page_size)
    assert len(seen_ids) == len(set(seen_ids)) == total
    assert seen_numbers == list(range(total - 1, -1, -1))
    as_pairs = [tuple(int(p) for p in i.split("-")) for i in seen_ids]
    assert as_pairs == sorted(as_pairs, reverse=True)
    # The same walk forwards (XRANGE, exclusive start) sees the same entries.
    forward: list[str] = []
    cursor = "-"
    while True:
        page = rdb.xrange(key, cursor, top, count=1_000)
        if not page:
            break
        forward.extend(i for i, _ in page)
        cursor = f"({page[-1][0]}"
    assert forward == seen_ids[::-1]
    assert rdb.xlen(key) == total + 600
