"""Claim races (docs/protocol.md "App pair"): exactly `max_uses` winners, session limit kept.

All of a pair must look atomic: of any number of racing apps exactly `max_uses` win, no
runner ever exceeds its session limit, and a use that cannot open its session is given
back.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mqtt_pairing.store import PairingStore
from mqtt_pairing.topics import Kind
from tests.harness.servers import StoreBackend
from tests.store.helpers import Api, RoundTrips, error_code, new_id

CLAIMERS = 50


async def _race(api: Api, code: str, apps: int, tag: str) -> list[dict[str, Any]]:
    return await asyncio.gather(*(api.pair(f"{tag}{i}", code) for i in range(apps)))


def _outcomes(replies: list[dict[str, Any]]) -> Counter[str]:
    return Counter(error_code(r) or "ok" for r in replies)


async def test_exactly_max_uses_of_many_racing_apps_win(api: Api) -> None:
    # two codes raced at once, by CLAIMERS apps each: max_uses 1 and 3
    codes = {1: await api.code("r1", max_uses=1), 3: await api.code("r3", max_uses=3)}
    races = await asyncio.gather(
        *(_race(api, code, CLAIMERS, f"app{max_uses}-") for max_uses, code in codes.items())
    )
    for (max_uses, code), replies in zip(codes.items(), races, strict=True):
        runner_id = f"r{max_uses}"
        assert _outcomes(replies) == {"ok": max_uses, "CODE_ALREADY_USED": CLAIMERS - max_uses}
        assert await api.runner_session_count(runner_id) == max_uses
        winners = {r["result"]["session"]["app_id"] for r in replies if r["ok"]}
        assert len(winners) == max_uses
        stored = await api.code_hash(code)
        assert stored["uses_left"] == "0"
        assert stored["state"] == "used"
        claims = await api.store.client.hgetall(api.store.keys.code_claims(api.digest(code)))
        assert len(claims) == max_uses


async def test_session_limit_is_never_exceeded_and_uses_are_given_back(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(pairing_max_sessions_per_runner=3)
    code = await api.code("r1", max_uses=10)
    replies = await _race(api, code, 20, "app")
    # as if the pairs ran one after another: 3 open, then the runner is full
    assert _outcomes(replies) == {"ok": 3, "SESSION_LIMIT_REACHED": 17}
    assert await api.runner_session_count("r1") == 3
    stored = await api.code_hash(code)
    assert stored["uses_left"] == "7"
    assert stored["state"] == "active"
    claims = await api.store.client.hgetall(api.store.keys.code_claims(api.digest(code)))
    assert len(claims) == 3
    # the runner is full: a later app is refused by the limit, and the use stays
    assert error_code(await api.pair("late", code)) == "SESSION_LIMIT_REACHED"
    assert (await api.code_hash(code))["uses_left"] == "7"


async def test_pairing_again_replaces_and_does_not_count_toward_the_limit(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(pairing_max_sessions_per_runner=2)
    code = await api.code("r1", max_uses=5)
    first = await api.pair_ok("a1", code)
    await api.pair_ok("a2", code)
    assert error_code(await api.pair("a3", code)) == "SESSION_LIMIT_REACHED"
    handled = await api.handle(Kind.APP, "a1", "pair", {"request_id": new_id(), "code": code})
    assert handled.reply is not None
    assert handled.reply["ok"], handled.reply
    assert handled.reply["result"]["session"]["session_id"] != first
    closed = [e for e in handled.events if e.payload["event"] == "session.closed"]
    assert {e.payload["session"]["closed_reason"] for e in closed} == {"replaced"}
    assert {e.payload["session"]["session_id"] for e in closed} == {first}
    assert await api.runner_session_count("r1") == 2
    assert await api.store.app_session_runner("a1", first) is None


async def test_a_use_held_by_a_claim_in_flight_is_waited_for(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_max_sessions_per_runner=1)
    await api.pair_ok("a0", await api.code("r1"))  # the runner is now full
    code = await api.code("r1", max_uses=1)
    digest = api.digest(code)
    # app a1 has claimed the only use (step 2) and not yet tried to open its session
    await store.claim_code(digest, "a1", "req-a1", "session-a1")
    # a2 pairs meanwhile; then a1's session is refused and its use given back (steps 3-4)
    a2 = asyncio.create_task(api.pair("a2", code))
    await asyncio.sleep(0.1)
    assert not a2.done()
    assert await store.unclaim_code(digest, "a1", "req-a1")
    # Serially, a2 sees the runner full either before or after a1: never a used code.
    assert error_code(await a2) == "SESSION_LIMIT_REACHED"
    assert (await api.code_hash(code))["uses_left"] == "1"


async def test_a_code_used_up_by_settled_pairs_is_refused_at_once(
    api: Api, store: PairingStore, store_backend: StoreBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = await api.code("r1")
    await api.pair_ok("a1", code)  # settled: the session is open
    round_trips = RoundTrips(store, monkeypatch)
    before, started = store.round_trips, time.monotonic()
    assert error_code(await api.pair("a2", code)) == "CODE_ALREADY_USED"
    assert time.monotonic() - started < 1.0
    # no waiting for a claim in flight (each retry would be another round trip)
    assert round_trips.count <= 5
    if not store_backend.cluster:
        # A cluster's batch sends its calls concurrently and `store.round_trips` counts
        # each of them; on a single Redis a batch is one pipeline, counted once.
        assert store.round_trips - before <= 5
