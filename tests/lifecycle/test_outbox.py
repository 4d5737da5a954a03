"""Outbox (docs/design.md "Delivery"): a crash between a state change and its publish loses no
event, and a restart publishes it once.

`python -m mqtt_pairing serve` runs as a real process with the fault point
`before_publish_events` armed (`MQTT_PAIRING_FAULT_POINT`): after a pair, the process
SIGKILLs itself with the session open in Redis and its events still in the outbox (the
reply is published before the events, so the app may have it). It is then started again
without the fault, with the same client id, as a supervisor would.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from mqtt_pairing.faults import FAULT_ENV
from mqtt_pairing.store.keys import KeySchema
from tests.harness.fixtures import MakeServe
from tests.harness.serve import ServeProcess
from tests.lifecycle.conftest import Peers
from tests.lifecycle.support import Wire, history, wait_until

pytestmark = pytest.mark.timeout(90)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


StartServe = Callable[..., Awaitable[ServeProcess]]


@pytest.fixture
def start_serve(serve_process: MakeServe) -> StartServe:
    """Factory: `await start_serve(fault=None)` starts serve (the harness's `serve_process`)
    and waits until it is ready.

    Every process shares the client id, key prefix and topic prefix of the test.
    """
    client_id = f"lc-serve:{uuid.uuid4().hex[:12]}"

    async def start(fault: str | None = None) -> ServeProcess:
        env = {"MQTT_CLIENT_ID": client_id}
        if fault is not None:
            env[FAULT_ENV] = fault
        serve = serve_process(**env)
        serve.start()
        await serve.wait_ready(START_TIMEOUT_S)
        return serve

    return start


async def crash_after_pair(
    start_serve: StartServe, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> tuple[str, dict[str, Any]]:
    """Pair while serve crashes before publishing the events; restart it.

    Returns:
        (session_id, the pair request), once the restarted service connected.
    """
    crashing = await start_serve(fault="before_publish_events")
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code())["code"]
        request = {"code": code, "request_id": f"pair-{uuid.uuid4().hex[:8]}"}
        await app.publish_raw("pair", json.dumps(request).encode())
        assert await crashing.wait_exit(STOP_TIMEOUT_S) == -signal.SIGKILL, crashing.output()

    # The state changed, the events wait in the outbox, none was published.
    (sid,) = rdb.hkeys(keys.runner_sessions("r1"))
    pending = [f["t"] for _, f in rdb.xrange(keys.outbox("r1"), "-", "+")]
    assert pending == ["session.opened"]  # one entry: the relay renders code.used from it
    assert wire.all_events() == []

    restarted = await start_serve()
    assert FAULT_ENV not in restarted.output()
    return sid, request


async def test_events_survive_a_crash_before_publish(
    start_serve: StartServe, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    sid, request = await crash_after_pair(start_serve, peers, wire, rdb, keys)
    await wire.wait_events("runner", "r1", "session.opened", timeout_s=30)
    await wire.wait_events("app", "a1", "session.opened", timeout_s=10)
    await wire.wait_events("runner", "r1", "code.used", timeout_s=10)
    # Once the outbox is drained (deleted) nothing will publish these again, and what was
    # published before the barrier's reply has reached the wire.
    await wait_until(lambda: rdb.exists(keys.outbox("r1")) == 0, 10, "the outbox to drain")
    await wire.barrier()

    # Exactly once each, counting copies on the wire (not deduplicated).
    for kind, ident in (("runner", "r1"), ("app", "a1")):
        opened = wire.events(kind, ident, "session.opened")
        assert len(opened) == 1, opened
        assert opened[0]["session"]["session_id"] == sid
    assert len(wire.events("runner", "r1", "code.used")) == 1
    assert len(wire.all_events()) == 3
    assert len({e["event_id"] for e in wire.events("runner", "r1")}) == 2
    assert (
        wire.events("runner", "r1", "session.opened")[0]["event_id"]
        == wire.events("app", "a1", "session.opened")[0]["event_id"]
    )

    # The app has (or gets, on redelivery) its reply; a retry with the same request_id
    # answers the same session and publishes nothing new. The crash came after the reply
    # but before it was remembered, so a retry within the dead attempt's pending lease
    # (PAIRING_PENDING_LEASE_S, 10 s) waits for it to run out first.
    async with peers.app("a1") as app:
        reply = await app.request("pair", request, timeout_s=20)
        assert reply["ok"], reply
        assert reply["result"]["session"]["session_id"] == sid
    await wire.barrier()
    assert len(wire.all_events()) == 3
    replies = wire.replies("app", "a1", "pair")
    assert replies
    assert all(r["ok"] and r["result"]["session"]["session_id"] == sid for r in replies)


async def test_events_recovered_after_a_crash_are_in_history(
    start_serve: StartServe, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    """A pair whose instance died before publishing is in the history once: its runner's
    record written with the open, the app's and the global one by the recovery (drain)
    that published and deleted its outbox entry."""
    sid, _ = await crash_after_pair(start_serve, peers, wire, rdb, keys)
    await wire.wait_events("app", "a1", "session.opened", timeout_s=10)

    def opened(kind: str, ident: str) -> list[str]:
        records = [f for _, f in history(rdb, keys.history(kind, ident))]
        return [f["session_id"] for f in records if f["event"] == "pair.succeeded"]

    # The history is appended once the events are out and the outbox entries deleted.
    await wait_until(
        lambda: opened("runner", "r1") and opened("app", "a1"), 10, "both history records"
    )
    assert opened("runner", "r1") == [sid]
    assert opened("app", "a1") == [sid]
    await asyncio.sleep(0.3)
    global_records = [f for _, f in history(rdb, keys.history_global(0))]
    assert [f["session_id"] for f in global_records if f["event"] == "pair.succeeded"] == [sid]
    assert "session.opened" not in {f["event"] for f in global_records}
