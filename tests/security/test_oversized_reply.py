"""A hostile request cannot make the service's reply too large for the broker.

broker-config/mosquitto.conf sets `max_packet_size`, and Mosquitto closes the connection
of any client that sends a larger packet, the service's included. A runner that sends a
request just under the limit, with a long MQTT 5 Response Topic (in its own `res/`) or
long Correlation Data, asks for a reply that carries both back plus a larger body: over
the limit. Before the bounds, the broker closed the service's connection, redelivered the
request (QoS 1, persistent session), and the service answered it again: a loop that
starved every other request.

- `test_oversized_properties_are_refused`: the request gets INVALID_REQUEST on the
  default reply topic (docs/protocol.md "MQTT 5 properties"), the service stays
  connected, and everyone else is answered.
- `test_poison_request_is_dropped_after_repeated_disconnects`: with those bounds switched
  off (as if a reply grew too large some other way), the request that keeps losing the
  connection is dropped after `POISON_STRIKES` losses, and everyone else is answered.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing import gateway as gateway_module
from mqtt_pairing.gateway import PairingGateway
from tests.harness.mqtt_wire import varint
from tests.harness.servers import RedisServer
from tests.harness.waiting import wait_until
from tests.security.attacks import legit_traffic, peers
from tests.security.harness import (
    RecordingRunner,
    SecureBroker,
    app_client,
    runner_client,
    running_service,
)
from tests.security.mosquitto_conf import MOSQUITTO_CONF, global_option

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

BROKER_LIMIT_BYTES = int(global_option(MOSQUITTO_CONF.read_text(), "max_packet_size") or 0)
MARGIN_BYTES = 60
"""How far under the limit the request is, and how far over it its reply would be."""


def publish_packet_bytes(topic: str, body: bytes, props: Properties, *, v5: bool) -> int:
    """Size of a QoS 1 MQTT 5 PUBLISH: fixed header, topic, packet id, properties, body."""
    assert v5
    remaining = 2 + len(topic.encode()) + 2 + len(props.pack()) + len(body)  # type: ignore[no-untyped-call]
    return 1 + len(varint(remaining)) + remaining


def _props(response_topic: str | None, correlation: bytes | None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


async def _hostile_request(
    runner: RecordingRunner, ident: str, what: str, request_id: str
) -> tuple[str, Properties, bytes]:
    """A `sessions` request under the broker's limit whose reply would be over it.

    Measures the reply body first (a plain `sessions`), then pads the Response Topic
    or the Correlation Data.
    """
    sessions = await runner.request("sessions", None)
    reply_body = len(json.dumps({**sessions, "request_id": request_id}, separators=(",", ":")))
    topic = f"pairing/runners/{ident}/req/sessions"
    payload = json.dumps({"request_id": request_id}).encode()
    base = f"pairing/runners/{ident}/res/"

    def build(n: int) -> Properties:
        if what == "response_topic":
            return _props(base + "x" * n, None)
        return _props(None, b"c" * n)

    target = BROKER_LIMIT_BYTES - MARGIN_BYTES
    n = target - publish_packet_bytes(topic, payload, build(0), v5=True)
    while publish_packet_bytes(topic, payload, build(n), v5=True) > target:
        n -= 1
    props = build(n)
    request_size = publish_packet_bytes(topic, payload, props, v5=True)
    # The reply: the same Response Topic (or the default one) and Correlation Data, a
    # Message Expiry Interval, and the reply body instead of the request's.
    reply_props = _props(None, props.CorrelationData if what == "correlation" else None)
    reply_props.MessageExpiryInterval = 600
    reply_topic = props.ResponseTopic if what == "response_topic" else base + "sessions"
    reply_size = publish_packet_bytes(reply_topic, b"x" * reply_body, reply_props, v5=True)
    assert request_size <= BROKER_LIMIT_BYTES - MARGIN_BYTES // 2, request_size
    assert reply_size >= BROKER_LIMIT_BYTES + MARGIN_BYTES // 2, (request_size, reply_size)
    return topic, props, payload


async def _pair_once(broker: SecureBroker, runner: RecordingRunner, app_id: str) -> None:
    """Give the runner a session, so that its `sessions` reply is larger than the request."""
    code = (await runner.request_code(runner_name="r" * 64))["code"]
    async with app_client(broker, app_id) as app:
        await app.pair(code, app_name="a" * 64)


@pytest.mark.parametrize("what", ["response_topic", "correlation"])
async def test_oversized_properties_are_refused(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    what: str,
) -> None:
    evil, pal = f"evil-{uid}", f"pal-{uid}"
    legit_r, legit_a = [f"lr{n}-{uid}" for n in range(3)], [f"la{n}-{uid}" for n in range(3)]
    broker = make_secure_broker(runners=[evil, *legit_r], apps=[pal, *legit_a])
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        runner_client(broker, evil) as runner,
    ):
        await _pair_once(broker, runner, pal)
        topic, props, payload = await _hostile_request(runner, evil, what, "huge-1")
        runner.received.clear()
        await runner.publish(topic, payload, properties=props)
        await wait_until(
            lambda: any(b'"huge-1"' in body for _, body in runner.received),
            10,
            "the reply to the hostile request",
        )
        [(reply_topic, raw)] = [(t, b) for t, b in runner.received if b'"huge-1"' in b]
        reply = json.loads(raw)
        assert reply_topic == f"pairing/runners/{evil}/res/sessions"
        assert (reply["ok"], reply["error"]["code"]) == (False, "INVALID_REQUEST")
        async with peers(broker, legit_r, legit_a) as (runners, apps):
            traffic = await legit_traffic(runners, apps)
        assert not traffic.lost, traffic.summary()
        counters = service.gateway.counters
        assert counters["connection_lost.requests"] == 0, dict(counters)
        expected = (
            "response_topic_too_long" if what == "response_topic" else ("correlation_data_too_long")
        )
        assert counters[f"refused.{expected}"] == 1, dict(counters)
        assert service.gateway.max_packet_bytes == BROKER_LIMIT_BYTES  # from the CONNACK


async def test_poison_request_is_dropped_after_repeated_disconnects(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first two defences off: long properties accepted, no packet size known.
    monkeypatch.setattr(gateway_module, "MAX_CORRELATION_DATA_BYTES", 1 << 20)
    monkeypatch.setattr(gateway_module, "MAX_RESPONSE_TOPIC_BYTES", 1 << 20)
    monkeypatch.setattr(PairingGateway, "_watch_connack", lambda self: None)
    evil, pal = f"evil-{uid}", f"pal-{uid}"
    legit_r, legit_a = [f"lr{n}-{uid}" for n in range(3)], [f"la{n}-{uid}" for n in range(3)]
    broker = make_secure_broker(runners=[evil, *legit_r], apps=[pal, *legit_a])
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        runner_client(broker, evil) as runner,
    ):
        await _pair_once(broker, runner, pal)
        topic, props, payload = await _hostile_request(runner, evil, "correlation", "poison")
        await runner.publish(topic, payload, properties=props)
        counters = service.gateway.counters
        await wait_until(lambda: counters["dropped.poison"], 60, "the poison request dropped")
        assert counters["connection_lost.requests"] == gateway_module.POISON_STRIKES
        await wait_until(service.gateway.connected.is_set, 30, "the service to reconnect")
        async with peers(broker, legit_r, legit_a) as (runners, apps):
            traffic = await legit_traffic(runners, apps)
        assert not traffic.lost, traffic.summary()
        await asyncio.sleep(0)
        assert counters["dropped.poison"] == 1
        assert counters["connection_lost.requests"] == gateway_module.POISON_STRIKES
