"""A retained request is never executed again (docs/protocol.md "Topics").

The case of the issue "The service's MQTT session under pressure": a runner publishes
`unpair {"all": true}` with the retain flag; the service answers it (`closed: 0`). The
runner is then paired, the request's dedupe record expires, and the service restarts
with the same client id. At the new subscription the broker replays the retained
request (Mosquitto does so for shared subscriptions too); the service must ignore it:
the session stays open, no second reply goes out, and (where the broker replayed it)
`dropped.retained` counts it. On MQTT 5 the service asks for no replay (Retain Handling
2), so Mosquitto sends none; the outcome must be the same.

Run on Mosquitto (MQTT 5 and 3.1.1, with and without a shared group) and on amqtt
(MQTT 3.1.1, no shared subscriptions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import aiomqtt
import pytest

from mqtt_pairing.broker import start_embedded_broker
from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.harness.servers import MosquittoBroker, RedisServer, free_port
from tests.reliability.conftest import ServiceOn
from tests.reliability.support import wait_until

pytestmark = pytest.mark.timeout(90)

CASES = [
    pytest.param("mosquitto", "5", "", id="mosquitto-5"),
    pytest.param("mosquitto", "5", "group", id="mosquitto-5-shared"),
    pytest.param("mosquitto", "3.1.1", "", id="mosquitto-3.1.1"),
    pytest.param("mosquitto", "3.1.1", "group", id="mosquitto-3.1.1-shared"),
    pytest.param("amqtt", "3.1.1", "", id="amqtt-3.1.1"),
]


@contextlib.asynccontextmanager
async def broker_url(
    kind: str, make_mosquitto: Callable[..., MosquittoBroker]
) -> AsyncIterator[str]:
    if kind == "mosquitto":
        yield make_mosquitto().url
        return
    port = free_port()
    broker = await start_embedded_broker("127.0.0.1", port)
    try:
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        await broker.shutdown()


class RawRunner:
    """A runner's raw connection: publishes with the retain flag, records `res/unpair`."""

    def __init__(self, address: BrokerAddress, prefix: str, protocol: str) -> None:
        self.base = f"{prefix}/runners/r1"
        self.replies: list[dict[str, Any]] = []
        self.client = aiomqtt.Client(
            address.host,
            address.port,
            identifier=f"raw-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5
            if protocol == "5"
            else aiomqtt.ProtocolVersion.V311,
            socket_options=[NODELAY],
            timeout=10,
        )

    async def read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            self.replies.append(json.loads(bytes(payload)))

    async def publish_retained(self, op: str, body: dict[str, Any]) -> None:
        await self.client.publish(f"{self.base}/req/{op}", json.dumps(body), qos=1, retain=True)

    async def clear(self, op: str) -> None:
        await self.client.publish(f"{self.base}/req/{op}", b"", qos=1, retain=True)


@pytest.mark.parametrize(("broker", "protocol", "group"), CASES)
async def test_a_retained_request_is_not_executed_again(
    broker: str,
    protocol: Literal["5", "3.1.1"],
    group: str,
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    service_on: ServiceOn,
    topic_prefix: str,
    rel_prefix: str,
) -> None:
    keys = KeySchema(rel_prefix)
    rdb = redis_server.client(decode_responses=True)
    async with broker_url(broker, make_mosquitto) as url:
        address = BrokerAddress.from_url(url)
        settings = {
            "mqtt_url": url,
            "redis_url": redis_server.url,
            "mqtt_protocol": protocol,
            "mqtt_client_id": f"ret:{uuid.uuid4().hex[:8]}",
            "pairing_shared_group": f"{group}-{uuid.uuid4().hex[:6]}" if group else "",
            "pairing_dedupe_ttl_s": 1,
        }
        first = await service_on(**settings)
        raw = RawRunner(address, topic_prefix, protocol)
        async with raw.client:
            await raw.client.subscribe(f"{raw.base}/res/unpair", qos=1)
            reader = asyncio.create_task(raw.read())
            try:
                # Live, the request is executed once: nothing to close yet.
                await raw.publish_retained("unpair", {"request_id": "u1", "all": True})
                await wait_until(lambda: raw.replies, 10, "the reply to the live request")
                assert raw.replies[0]["ok"], raw.replies
                assert raw.replies[0]["result"] == {"closed": 0}

                runner = RunnerClient("r1", address, prefix=topic_prefix, protocol=protocol)
                app = AppClient("a1", address, prefix=topic_prefix, protocol=protocol)
                async with runner, app:
                    code = (await runner.request_code())["code"]
                    session_id = (await app.pair(code))["session"]["session_id"]
                    dedupe = keys.dedupe("runner", "r1", "unpair", "u1")
                    await wait_until(lambda: not rdb.exists(dedupe), 10, "u1's dedupe to expire")

                    # A restart: same client id, a new subscription, the retained replay.
                    await first.stop()
                    second = await service_on(**settings)
                    # Messages are read in order: once a later request is answered and
                    # nothing is in flight, the replay (if any) has been dealt with.
                    listed = await runner.sessions()
                    gateway = second.service.gateway
                    await wait_until(lambda: gateway.in_flight == 0, 10, "in-flight work")

                    assert [s["session_id"] for s in listed] == [session_id]
                    assert list(rdb.hkeys(keys.runner_sessions("r1"))) == [session_id]
                    assert len(raw.replies) == 1, raw.replies  # never answered again
                    replayed = gateway.counters["dropped.retained"]
                    if protocol == "3.1.1":  # replayed by the broker (amqtt: twice), ignored
                        assert replayed >= 1
                    assert second.counters["ok.unpair"] == 0
            finally:
                with contextlib.suppress(aiomqtt.MqttError):
                    await raw.clear("unpair")
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await reader
    rdb.close()
