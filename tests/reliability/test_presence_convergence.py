"""Presence converges after a restart, even when more changed than a broker queue holds.

The case of the issue "The service's MQTT session under pressure": 1,500 runners, all
known to the service; with the service stopped, 750 go offline and 750 come online; then
the broker restarts (persistence on) and the service comes back with the same client id.
The broker caps every session's queue at `max_queued_messages 1000` (the shipped value at
the time), fewer than the 1,500 changes, and caps the retained replay of a subscription
the same way. Afterwards the presence Redis records must match every runner's retained
status, within a bound.

`PRESENCE_RUNNERS=100000 scripts/test tests/reliability/test_presence_convergence.py -s`
measures a larger fleet (docs/operations.md quotes the figures).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.reliability.conftest import ServiceOn
from tests.reliability.statuses import State, publish_statuses, wait_recorded
from tests.reliability.support import report, wait_until

RUNNERS = int(os.environ.get("PRESENCE_RUNNERS", "1500"))
QUEUE_CAP = "max_queued_messages 1000\n"
CHUNK = {"5": 20_000, "3.1.1": 500}
"""Runners made known at a time: a burst the presence session holds at the broker (MQTT
5: 65,535 in flight plus the queue of 1000; MQTT 3.1.1: 20 plus 1000)."""
CONVERGE_S = max(60.0, RUNNERS / 100)
"""The bound: generous for a loaded 2-core machine (about 1 s is typical for 1,500)."""

pytestmark = pytest.mark.timeout(300 + RUNNERS // 100)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_presence_converges_after_service_and_broker_restart(
    protocol: str,
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    service_on: ServiceOn,
    topic_prefix: str,
    rel_prefix: str,
) -> None:
    broker = make_mosquitto(extra_config=QUEUE_CAP)
    address = BrokerAddress(broker.host, broker.port)
    keys = KeySchema(rel_prefix)
    rdb = redis_server.client(decode_responses=True)
    client_id = f"conv:{uuid.uuid4().hex[:8]}"
    settings = {
        "mqtt_url": broker.url,
        "redis_url": redis_server.url,
        "mqtt_client_id": client_id,
        "mqtt_protocol": protocol,
        "mqtt_session_expiry_s": 3600,
    }
    runners = [f"r{i}" for i in range(RUNNERS)]
    half = RUNNERS // 2
    before: dict[str, State] = {
        r: "online" if i < half else "offline" for i, r in enumerate(runners)
    }
    after: dict[str, State] = {
        r: "offline" if s == "online" else "online" for r, s in before.items()
    }
    loop = asyncio.get_running_loop()
    try:
        service = await service_on(**settings)
        # Every runner known first, a chunk at a time, as a fleet comes online: a burst of
        # new runners larger than the broker's queue loses some until their next status
        # (docs/operations.md, "Restarts: presence converges"); storms are
        # test_presence_flood.py's subject.
        items = list(before.items())
        for start in range(0, len(items), CHUNK[protocol]):
            chunk = items[start : start + CHUNK[protocol]]
            await asyncio.to_thread(publish_statuses, address, topic_prefix, chunk)
            await wait_recorded(rdb, keys, dict(chunk), CONVERGE_S, "the first statuses")
        await service.stop()

        # The service is away: every runner changes; then the broker restarts.
        await asyncio.to_thread(publish_statuses, address, topic_prefix, list(after.items()))
        await asyncio.to_thread(broker.restart)

        started = loop.time()
        service = await service_on(**settings)
        connected_s = loop.time() - started
        await wait_recorded(rdb, keys, after, CONVERGE_S, "presence after the restart")
        took = loop.time() - started
        gateway = service.service.gateway
        await wait_until(  # for the report: how long the whole reconciliation took
            lambda: gateway.presence.counters["presence.reconciled"] >= 1,
            CONVERGE_S,
            "the reconciliation",
        )
        presence = gateway.presence
        report(
            f"presence convergence, {RUNNERS} runners, MQTT {protocol}",
            service_connected_s=f"{connected_s:.2f}",
            converged_after_start_s=f"{took:.2f}",
            reconciliations=gateway.presence.counters["presence.reconciled"],
            last_reconcile_s=f"{presence.last_reconcile_s:.2f}",
            statuses_recorded=service.counters["status"],
            shed=gateway.presence.counters["status_shed"],
        )
    finally:
        rdb.close()  # a private broker: no retained status to clear
