"""A presence-lease holder SIGKILLed, and a runner's status changing inside the lease gap.

Two `serve` processes share the requests (one shared group); one at a time records
runners' status messages, the holder of the presence lease in Redis. The holder is
killed (SIGKILL: its lease stays in Redis until it runs out) and the runner goes offline
right then, while nobody records statuses. Once the lease has lapsed the other process
takes it, subscribes, gets the retained status from the broker and must record the
change: Redis says offline, the paired app gets exactly one `runner.offline`, and asks
for its runners' status to hear the same.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.harness.fixtures import MakeServe
from tests.harness.peers import Peers, StatusLink, clear_retained
from tests.harness.recorder import Recorder
from tests.harness.servers import RedisServer
from tests.harness.waiting import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.mosquitto, pytest.mark.timeout(90)]

LEASE_S = 3
TAKEOVER_BOUND_S = LEASE_S + 15
"""The lease runs out, the other process notices (it tries every lease/3), subscribes and
records the replayed status: bounded generously for a loaded machine."""


async def test_a_status_change_in_the_lease_gap_of_a_killed_holder_is_recorded(
    serve_process: MakeServe,
    recorder: Recorder,
    peers: Peers,
    redis_server: RedisServer,
    service_key_prefix: str,
    broker_address: BrokerAddress,
    topic_prefix: str,
) -> None:
    env = {
        "PAIRING_SHARED_GROUP": f"presence-{uuid.uuid4().hex[:8]}",
        "PAIRING_PRESENCE_LEASE_S": str(LEASE_S),
    }
    serves = [serve_process(**env) for _ in range(2)]
    for serve in serves:
        serve.start()
    for serve in serves:
        await serve.wait_ready()
    keys = KeySchema(service_key_prefix)
    rdb = redis_server.client(decode_responses=True)
    link = StatusLink(broker_address, topic_prefix, "r1", keepalive_s=30)
    try:
        holder = await wait_until(
            lambda: rdb.get(keys.presence_leader()), 10, "a presence lease holder"
        )
        by_client_id = {s.env["MQTT_CLIENT_ID"]: s for s in serves}
        holder_id = str(holder).rpartition("/")[0]
        assert holder_id in by_client_id, (holder, list(by_client_id))
        doomed = by_client_id.pop(holder_id)
        (survivor_id,) = by_client_id

        await asyncio.to_thread(link.connect)
        async with peers.runner("r1") as runner, peers.app("a1") as app:
            await app.pair((await runner.request_code())["code"])
            await asyncio.to_thread(link.publish, "online")
            await wait_until(
                lambda: rdb.hget(keys.runner("r1"), "status") == "online",
                10,
                "the runner recorded online",
            )

            doomed.kill()
            await asyncio.to_thread(link.publish, "offline")
            # The change came inside the gap: the dead holder's lease was still running.
            assert rdb.get(keys.presence_leader()) == holder

            await wait_until(
                lambda: rdb.hget(keys.runner("r1"), "status") == "offline",
                TAKEOVER_BOUND_S,
                "the status change made in the lease gap to be recorded",
            )
            offline = await recorder.wait_events(
                "app", "a1", "runner.offline", timeout_s=TAKEOVER_BOUND_S
            )
            assert str(rdb.get(keys.presence_leader())).startswith(survivor_id + "/")
            status = await app.status()
            assert [r["online"] for r in status["runners"]] == [False], status
            await recorder.barrier()
            offline = recorder.events("app", "a1", "runner.offline")
            assert len({e["event_id"] for e in offline}) == 1, offline
    finally:
        await asyncio.to_thread(link.close)
        await asyncio.to_thread(clear_retained, broker_address, [link.topic])
        rdb.close()
