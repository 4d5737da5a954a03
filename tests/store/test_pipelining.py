"""Auto-pipelining (`mqtt_pairing.store.pipelining`): concurrent batches share round trips.

The Coalescer's own rules with a fake exchange (every caller gets exactly its own replies,
whatever the sizes and turns; at most `max_exchanges` on the wire; a failed exchange fails
its batches only; a caller cancelled before its exchange keeps its commands off the wire),
then the store on Redis, fakeredis and the cluster: a burst of concurrent batches gets
the right replies, and on one Redis it takes far fewer round trips than batches.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_pairing.errors import StoreUnavailable
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from mqtt_pairing.store.pipelining import Coalescer, Command
from mqtt_pairing.store.redis_store import RawCall
from tests.harness.servers import StoreBackend


class FakeRedis:
    """An exchange that answers each command with itself, and records what it was sent."""

    def __init__(self, *, gate: asyncio.Event | None = None) -> None:
        self.sent: list[list[Command]] = []
        self.running = 0
        self.most_running = 0
        self.gate = gate
        self.fail_next = False

    async def exchange(self, commands: list[Command]) -> list[Any]:
        self.sent.append(list(commands))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            if self.fail_next:
                self.fail_next = False
                raise ConnectionError("gone")
            return [("reply", *c) for c in commands]
        finally:
            self.running -= 1


async def test_batches_of_one_turn_go_out_in_one_exchange_each_with_its_own_replies() -> None:
    fake = FakeRedis()
    pipe = Coalescer(fake.exchange)
    batches = [[("GET", f"k{i}", j) for j in range(i % 3 + 1)] for i in range(50)]
    replies = await asyncio.gather(*(pipe.run(b) for b in batches))
    assert len(fake.sent) == 1
    assert fake.sent[0] == [c for b in batches for c in b]
    for batch, reply in zip(batches, replies, strict=True):
        assert reply == [("reply", *c) for c in batch]
    assert (pipe.exchanges, pipe.batches) == (1, 50)


async def test_no_more_exchanges_than_the_bound_and_the_rest_wait_together() -> None:
    gate = asyncio.Event()
    fake = FakeRedis(gate=gate)
    pipe = Coalescer(fake.exchange, max_exchanges=2)
    tasks = []
    for i in range(30):  # one batch per turn: without the bound, 30 exchanges at once
        tasks.append(asyncio.create_task(pipe.run([("INCR", f"k{i}")])))
        await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert fake.running == 2
    gate.set()
    replies = await asyncio.gather(*tasks)
    assert replies == [[("reply", "INCR", f"k{i}")] for i in range(30)]
    assert fake.most_running == 2
    # the two first went alone; everything queued behind them went out together
    assert len(fake.sent) == 3
    assert len(fake.sent[2]) == 28


async def test_a_failed_exchange_fails_its_batches_only() -> None:
    gate = asyncio.Event()
    fake = FakeRedis(gate=gate)
    pipe = Coalescer(fake.exchange, max_exchanges=1)
    fake.fail_next = True
    first = [asyncio.create_task(pipe.run([("GET", "a")])) for _ in range(3)]
    await asyncio.sleep(0)
    later = asyncio.create_task(pipe.run([("GET", "b")]))
    await asyncio.sleep(0)
    gate.set()
    for task in first:
        with pytest.raises(ConnectionError):
            await task
    assert await later == [("reply", "GET", "b")]


async def test_a_caller_cancelled_before_its_exchange_sends_nothing() -> None:
    gate = asyncio.Event()
    fake = FakeRedis(gate=gate)
    pipe = Coalescer(fake.exchange, max_exchanges=1)
    busy = asyncio.create_task(pipe.run([("GET", "first")]))
    await asyncio.sleep(0)
    gone = asyncio.create_task(pipe.run([("INCR", "never")]))
    kept = asyncio.create_task(pipe.run([("INCR", "kept")]))
    await asyncio.sleep(0)
    gone.cancel()
    gate.set()
    assert await busy == [("reply", "GET", "first")]
    assert await kept == [("reply", "INCR", "kept")]
    assert all(("INCR", "never") not in sent for sent in fake.sent)


async def test_closing_cancels_the_exchanges_on_the_wire() -> None:
    fake = FakeRedis(gate=asyncio.Event())
    pipe = Coalescer(fake.exchange)
    waiting = asyncio.create_task(pipe.run([("GET", "a")]))
    await asyncio.sleep(0.01)
    await pipe.aclose()
    with pytest.raises(asyncio.CancelledError):
        await waiting


@settings(max_examples=60, deadline=None)
@given(
    plan=st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4)),  # (turns to wait, batch size)
        min_size=1,
        max_size=40,
    ),
    bound=st.integers(1, 4),
)
def test_every_caller_gets_its_own_replies_whatever_the_turns(
    plan: list[tuple[int, int]], bound: int
) -> None:
    async def main() -> None:
        fake = FakeRedis()
        pipe = Coalescer(fake.exchange, max_exchanges=bound)

        async def caller(i: int, wait: int, size: int) -> None:
            for _ in range(wait):
                await asyncio.sleep(0)
            batch = [("CMD", i, j) for j in range(size)]
            assert await pipe.run(batch) == [("reply", *c) for c in batch]

        await asyncio.gather(*(caller(i, w, n) for i, (w, n) in enumerate(plan)))
        sent = [c for exchange in fake.sent for c in exchange]
        assert sorted(sent) == sorted(
            ("CMD", i, j) for i, (_, n) in enumerate(plan) for j in range(n)
        )
        assert fake.most_running <= bound

    asyncio.run(main())


async def test_a_burst_of_concurrent_batches_shares_round_trips(store: PairingStore) -> None:
    key = f"{store.keys.prefix}:{{pipe}}:n"
    n = 400

    async def one(i: int) -> list[Any]:
        return await store.batch([RawCall(("INCR", key)), RawCall(("SET", f"{key}:{i}", i))])

    before = store.pipeline.exchanges
    results = await asyncio.gather(*(one(i) for i in range(n)))
    counts = sorted(r[0] for r in results)
    assert counts == list(range(1, n + 1))  # every INCR ran once, each reply to its caller
    assert all(r[1] is True for r in results)
    assert await store.call(RawCall(("GET", f"{key}:{n - 1}"))) == str(n - 1)
    if not store._cluster:
        # one Redis: the 400 batches went out in a handful of writes
        assert store.pipeline.exchanges - before <= 10


async def test_batches_sharing_an_exchange_with_no_redis_fail_as_unavailable() -> None:
    # A real refused connection (nothing listens on port 1): every batch of the shared
    # exchange hears SERVICE_UNAVAILABLE, none hangs.
    store = PairingStore(connect_redis("redis://127.0.0.1:1", timeout_s=0.5), KeySchema("dead"))
    try:
        outcomes = await asyncio.gather(
            *(store.call(RawCall(("GET", f"k{i}"))) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(o, StoreUnavailable) for o in outcomes), outcomes
        assert store.pipeline.exchanges <= 2
    finally:
        await store.aclose()


async def test_a_burst_after_script_flush_takes_no_extra_connections(
    store_backend: StoreBackend, prefix: str
) -> None:
    """Scripts missing from Redis (a restart, SCRIPT FLUSH) are sent with EVAL in the
    shared exchanges, not by a fresh connection per waiting call."""
    client = connect_redis(store_backend.url, timeout_s=5.0, cluster=store_backend.cluster)
    store = PairingStore(client, KeySchema(prefix))
    made = 0
    if not store._cluster:
        pool = client.connection_pool
        make = pool.make_connection

        def counted() -> Any:
            nonlocal made
            made += 1
            return make()

        pool.make_connection = counted  # type: ignore[method-assign]
    try:
        await store.ping()
        await store.client.script_flush()
        results = await asyncio.gather(
            *(store.mark_outbox_due(f"r{i}", delay_s=1, shards=4) for i in range(300))
        )
        assert results == [None] * 300
        assert await store.client.zcard(store.keys.outbox_due(store.keys.shard_of("r1", 4))) > 0
        if not store._cluster:
            assert made <= 3  # the ping's, and at most 2 exchanges on the wire
    finally:
        await store.aclose()


async def test_an_outage_logs_one_line_a_second_not_one_per_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = PairingStore(connect_redis("redis://127.0.0.1:1", timeout_s=0.5), KeySchema("dead"))
    try:
        with caplog.at_level("WARNING", logger="mqtt_pairing.store.transport"):
            for _ in range(3):
                await asyncio.gather(
                    *(store.call(RawCall(("GET", f"k{i}"))) for i in range(50)),
                    return_exceptions=True,
                )
        lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert 1 <= len(lines) <= 2, lines
    finally:
        await store.aclose()
