"""Oversized messages: refused by the service above 4096 bytes, by the broker above its limit.

docs/protocol.md: payloads are at most 4096 bytes and larger ones are not parsed (they get
INVALID_REQUEST with `request_id` null). broker-config/mosquitto.conf sets
`max_packet_size`: Mosquitto drops the connection of a client that sends a larger packet.
Neither may disturb the other clients.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Callable

import pytest

from tests.harness.mqtt_wire import varint
from tests.harness.servers import RedisServer
from tests.harness.waiting import wait_until
from tests.security.harness import SecureBroker, Sniffer, app_client, runner_client, running_service
from tests.security.mosquitto_conf import MOSQUITTO_CONF, global_option

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

SERVICE_LIMIT_BYTES = 4096
BROKER_LIMIT_BYTES = int(global_option(MOSQUITTO_CONF.read_text(), "max_packet_size") or 0)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + varint(len(body)) + body


def send_oversized_publish(
    host: str, port: int, username: str, password: str, topic: str, payload: bytes
) -> bytes:
    """MQTT 3.1.1 over a raw socket: CONNECT, then a QoS 1 PUBLISH of `payload`.

    A raw socket because a client library may refuse to send a packet above the limit the
    broker announced; the broker itself must refuse it. Returns what the broker sent after
    the PUBLISH, up to the connection closing (b"" when it just closed it).
    """
    connect = _packet(
        0x10,
        _utf8("MQTT")
        + bytes([4, 0b1100_0010])  # level 4; username, password, clean session
        + struct.pack("!H", 30)
        + _utf8(f"raw-{username}")
        + _utf8(username)
        + _utf8(password),
    )
    publish = _packet(0x32, _utf8(topic) + struct.pack("!H", 1) + payload)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(connect)
        connack = sock.recv(4)
        assert connack == b"\x20\x02\x00\x00", connack
        received = b""
        try:
            sock.sendall(publish)
            while chunk := sock.recv(4096):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        return received


async def test_payloads_above_the_service_and_broker_limits_are_refused(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    assert BROKER_LIMIT_BYTES > SERVICE_LIMIT_BYTES, "mosquitto.conf sets no max_packet_size"
    big, r1, r2, a2 = f"big-{uid}", f"r1-{uid}", f"r2-{uid}", f"a2-{uid}"
    broker = make_secure_broker(runners=[r1, r2], apps=[big, a2])
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        Sniffer(broker.address("app", big), "big") as sender,
        runner_client(broker, r1) as runner1,
        runner_client(broker, r2) as runner2,
        app_client(broker, a2) as bystander,
    ):
        await sender.subscribe([f"pairing/apps/{big}/res/+"])
        counters = service.gateway.dispatcher.counters

        # Above the service's limit, below the broker's: INVALID_REQUEST, request_id null,
        # while another pairing goes on at the same time.
        body = {"request_id": "too-big", "code": "7KQ-M2X-9PZ", "pad": ""}
        body["pad"] = "x" * (SERVICE_LIMIT_BYTES + 1 - len(json.dumps(body).encode()))
        payload = json.dumps(body).encode()
        assert SERVICE_LIMIT_BYTES < len(payload) < BROKER_LIMIT_BYTES
        code = (await runner1.request_code())["code"]
        _, paired = await asyncio.gather(
            sender.publish(f"pairing/apps/{big}/req/pair", payload), bystander.pair(code)
        )
        assert paired["session"]["runner_id"] == r1
        await wait_until(lambda: sender.received, 10, "the reply to the oversized request")
        [(topic, raw)] = sender.received
        reply = json.loads(raw)
        assert topic == f"pairing/apps/{big}/res/pair"
        assert reply["request_id"] is None
        assert reply["error"]["code"] == "INVALID_REQUEST"
        assert counters["error.INVALID_REQUEST"] == 1
        # Exactly at the limit it is parsed (and fails on the code, not the size).
        body["pad"] = body["pad"][:-1]
        exact = json.dumps(body).encode()
        assert len(exact) == SERVICE_LIMIT_BYTES
        await sender.publish(f"pairing/apps/{big}/req/pair", exact)
        await wait_until(lambda: len(sender.received) >= 2, 10, "the reply at the limit")
        assert len(sender.received) == 2, sender.received
        assert json.loads(sender.received[1][1])["request_id"] == "too-big"

        # Above the broker's limit: the connection is dropped, nothing reaches the service.
        before = dict(counters)
        answer = await asyncio.to_thread(
            send_oversized_publish,
            broker.host,
            broker.ports["app"],
            big,
            broker.passwords["app", big],
            f"pairing/apps/{big}/req/pair",
            b"{" + b" " * (BROKER_LIMIT_BYTES + 1024) + b"}",
        )
        assert answer == b"", "the broker answered the oversized PUBLISH instead of closing"
        log_lines = broker.log_path.read_text().splitlines()
        # Its client id is its username on the apps listener (use_username_as_clientid).
        assert any(f"Client {big} " in line and "oversize" in line for line in log_lines)
        # Everyone else carries on: the bystander and a new pairing.
        assert await bystander.sessions()
        code2 = (await runner2.request_code())["code"]
        assert (await bystander.pair(code2))["session"]["runner_id"] == r2
        # The service counts a request before it publishes the reply, and the broker shut
        # the oversized sender out before it closed the socket: nothing is left to count.
        assert dict(counters) == {**before, "ok.sessions": 1, "ok.code": 2, "ok.pair": 2}
        assert dict(service.gateway.counters) == {}
