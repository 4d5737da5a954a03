"""A runner offline while it is paired gets `session.opened` when it comes back (issue 6).

The runner is a plain aiomqtt client with a fixed client id and a persistent session
(MQTT 5: clean start off and a Session Expiry Interval; MQTT 3.1.1: clean session off):
it asks for a code, disconnects (without saying it is offline), an app pairs with the
code, and when the runner reconnects (same client id, without subscribing again) the
broker hands it the `session.opened` and `code.used` the service published meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any, Literal

import aiomqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from tests.reliability.support import report
from tests.service.support import Peers, Sniffer, StartService


def runner_link(
    address: BrokerAddress, client_id: str, protocol: Literal["5", "3.1.1"], *, persistent: bool
) -> aiomqtt.Client:
    """A runner's connection; `persistent` keeps its broker session across disconnects."""
    kwargs: dict[str, Any]
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = 120 if persistent else 0
        kwargs = {
            "protocol": aiomqtt.ProtocolVersion.V5,
            "clean_start": not persistent,
            "properties": props,
        }
    else:
        kwargs = {"protocol": aiomqtt.ProtocolVersion.V311, "clean_session": not persistent}
    return aiomqtt.Client(
        address.host,
        address.port,
        identifier=client_id,
        socket_options=[NODELAY],
        timeout=10,
        **kwargs,
    )


async def next_json(client: aiomqtt.Client, timeout_s: float = 10.0) -> tuple[str, Any]:
    async with asyncio.timeout(timeout_s):
        message = await anext(aiter(client.messages))
    payload = message.payload
    assert isinstance(payload, bytes | bytearray)
    return message.topic.value, json.loads(payload)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_offline_runner_gets_session_opened_on_reconnect(
    protocol: Literal["5", "3.1.1"],
    start_service: StartService,
    broker_address: BrokerAddress,
    peers: Peers,
    sniffer: Sniffer,
) -> None:
    await start_service()
    client_id = f"runner-r1-{uuid.uuid4().hex[:8]}"
    base = f"{peers.prefix}/runners/r1"
    try:
        async with runner_link(broker_address, client_id, protocol, persistent=True) as link:
            await link.subscribe(f"{base}/res/+", qos=1)
            await link.subscribe(f"{base}/events", qos=1)
            await link.publish(f"{base}/req/code", json.dumps({"request_id": "c1"}), qos=1)
            topic, reply = await next_json(link)
            assert topic == f"{base}/res/code"
            assert reply["ok"] is True, reply
            code = reply["result"]["code"]
        # The runner is away (its status untouched: unknown, not offline).
        async with peers.app("a1") as app:
            paired = await app.pair(code)
        session_id = paired["session"]["session_id"]
        loop = asyncio.get_running_loop()
        published = await sniffer.next(f"{base}/events")  # the service did publish it
        published_at = loop.time()
        assert published.json()["event"] in ("session.opened", "code.used")

        # Back with the same client id and its session: no new subscription needed.
        async with runner_link(broker_address, client_id, protocol, persistent=True) as link:
            got: dict[str, Any] = {}
            while len(got) < 2:
                topic, event = await next_json(link)
                assert topic == f"{base}/events"
                got.setdefault(event["event"], event)
            delivered_s = loop.time() - published_at
        assert set(got) == {"session.opened", "code.used"}
        opened = got["session.opened"]
        assert opened["session"]["session_id"] == session_id
        assert opened["session"]["runner_id"] == "r1"
        assert opened["session"]["app_id"] == "a1"
        assert opened["session"] == paired["session"]
        report(f"offline runner, MQTT {protocol}", events_on_reconnect_after_s=f"{delivered_s:.2f}")
    finally:
        # Drop the persistent session from the shared broker.
        with contextlib.suppress(aiomqtt.MqttError):
            async with runner_link(broker_address, client_id, protocol, persistent=False):
                pass
