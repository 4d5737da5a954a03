"""End to end: the service survives a broker restart (reconnect with backoff)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import build_service
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.harness.waiting import wait_until
from tests.service.support import SECRET, Peers, start_running


async def test_service_reconnects_after_broker_restart(
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    topic_prefix: str,
) -> None:
    broker = make_mosquitto()
    unique = uuid.uuid4().hex[:12]
    settings = load_settings(
        mqtt_url=broker.url,
        redis_url=redis_server.url,
        pairing_secret=SECRET,
        pairing_topic_prefix=topic_prefix,
        pairing_key_prefix=f"e2e-{unique}",
        mqtt_client_id=f"svc:{unique}",
        pairing_shared_group="",
        pairing_shutdown_grace_s=2.0,
        mqtt_reconnect_max_s=0.5,
    )
    address = BrokerAddress(broker.host, broker.port)
    running = await start_running(await build_service(settings), address, topic_prefix)
    connected = running.service.gateway.connected
    try:
        peers = Peers(address, topic_prefix)
        async with peers.runner("r1") as runner:
            code = (await runner.request_code())["code"]

        await asyncio.to_thread(broker.stop)
        await wait_until(lambda: not connected.is_set(), 10, "the service to notice")
        await asyncio.to_thread(broker.start)
        await wait_until(connected.is_set, 10, "the service to reconnect")
        running.assert_serving()

        async with peers.runner("r1") as runner, peers.app("a1") as app:
            paired = await app.pair(code)
            assert paired["session"]["runner_id"] == "r1"
            assert [s["session_id"] for s in await runner.sessions()] == [
                paired["session"]["session_id"]
            ]
    finally:
        await running.stop()
