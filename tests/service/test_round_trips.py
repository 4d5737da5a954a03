"""Redis round trips of one request through the real gateway (issue 7's budget).

A successful pair makes 3 (a pipelined batch counts as one): claim, open, and the batch
after the reply that finishes the request and deletes the outbox entries; a failed guess
makes 2. Each request is counted in the task that processes it, so the sweep and other
requests cannot add to it. What the deferred batch does is checked too: the reply is
remembered, the claim settled, the history written, the outbox emptied.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

from mqtt_pairing.admin import AdminService
from mqtt_pairing.client import ReplyError
from mqtt_pairing.topics import Identity, Kind
from tests.service.support import Peers, RunningService

T = TypeVar("T")


class PerRequest:
    """Counts `PairingStore._guard` calls (one per round trip) by op of the message."""

    def __init__(self, running: RunningService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: Counter[str] = Counter()
        self.done: Counter[str] = Counter()
        self._current: dict[asyncio.Task[Any], str] = {}
        gateway, store = running.service.gateway, running.service.store
        original_guard, original_process = store._guard, gateway._process

        def guard(awaitable: Awaitable[T]) -> Awaitable[T]:
            task = asyncio.current_task()
            if task is not None and task in self._current:
                self.counts[self._current[task]] += 1
            return original_guard(awaitable)

        async def process(message: Any) -> None:
            task = asyncio.current_task()
            assert task is not None
            op = message.topic.value.rsplit("/", 1)[-1]
            self._current[task] = op
            try:
                await original_process(message)
            finally:
                del self._current[task]
                self.done[op] += 1

        monkeypatch.setattr(store, "_guard", guard)
        monkeypatch.setattr(gateway, "_process", process)

    async def settled(self, op: str, n: int) -> None:
        """Wait until `n` messages of `op` were processed to the end (after the reply)."""
        async with asyncio.timeout(10):
            while self.done[op] < n:
                await asyncio.sleep(0.01)


async def test_a_successful_pair_makes_three_round_trips_and_a_failed_guess_two(
    running_service: RunningService, peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app, peers.app("a2") as other:
        # Warm up: the first calls load the Lua scripts (NOSCRIPT, then EVALSHA again).
        await other.pair((await runner.request_code())["code"])
        with pytest.raises(ReplyError):
            await other.pair("000-000-000")
        code = (await runner.request_code())["code"]
        per = PerRequest(running_service, monkeypatch)
        result = await app.pair(code, request_id="p-1")
        await per.settled("pair", 1)
        assert per.counts["pair"] == 3, per.counts
        with pytest.raises(ReplyError) as failed:
            await other.pair("ZZZ-ZZZ-ZZZ")
        assert failed.value.code == "CODE_NOT_FOUND"
        await per.settled("pair", 2)
        assert per.counts["pair"] == 3 + 2, per.counts

    # The batch after the reply did its work.
    store = running_service.service.store
    session_id = result["session"]["session_id"]
    again = await running_service.service.gateway.dispatcher.handle(
        Identity(Kind.APP, "a1"), "pair", f'{{"request_id":"p-1","code":"{code}"}}'.encode()
    )
    assert again.reply is not None
    assert again.reply["result"]["session"]["session_id"] == session_id  # remembered
    assert not again.outbox  # a replay has no effect
    assert await store.read_outbox("r1") == []  # published and deleted
    claims = await store.client.hgetall(store.keys.code_claims(_digest(running_service, code)))
    assert list(claims.values()) == [session_id]  # settled: no in-flight timestamp
    assert not await store.client.exists(store.keys.outbox("r1"))
    page = await AdminService(store, running_service.settings).history(app_id="a1")
    # One record per pair in each stream (the runner's written with the open).
    assert [r.entry.event for r in page.records] == ["pair.succeeded"]
    runner_page = await AdminService(store, running_service.settings).history(runner_id="r1")
    paired = [r.entry for r in runner_page.records if r.entry.event == "pair.succeeded"]
    assert [e.session_id for e in paired if e.app_id == "a1"] == [session_id]


async def test_the_app_lists_its_session_as_soon_as_it_has_the_reply(
    running_service: RunningService, peers: Peers
) -> None:
    """The app's index is written with the open, before the reply: no race to lose."""
    async with peers.runner("r2") as runner, peers.app("a3") as app:
        for _ in range(5):
            code = (await runner.request_code())["code"]
            result = await app.pair(code)
            listed = [s["session_id"] for s in await app.sessions()]
            assert listed == [result["session"]["session_id"]]


def _digest(running: RunningService, code: str) -> str:
    return running.service.gateway.dispatcher.codes.digest(code.replace("-", ""))
