"""A DISCONNECT with reason 0x8E (Session taken over) is named at once and backed off.

Mosquitto from 2.0.15, EMQX and HiveMQ send it to the connection whose session another
client took. Mosquitto 2.0.11 does not (it closes the socket; tests/reliability/
test_twin.py covers that on the real broker), so a minimal MQTT 5 server plays the broker
here. The takeover is logged and counted, `conflict` holds, and the reconnect waits the
takeover backoff instead of 0.2 s. This pins how aiomqtt and paho surface the reason
code, which `mqtt_link.reason_code` relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

import pytest

from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.mqtt_link import (
    SESSION_TAKEN_OVER,
    TAKEOVER_FIRST_S,
    Endpoint,
    MqttLink,
    make_client,
)
from tests.reliability.support import wait_until

pytestmark = pytest.mark.timeout(60)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("mqtt_pairing")]


async def _takeover_broker(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connects: list[bytes]
) -> None:
    """Accept an MQTT 5 CONNECT, then send DISCONNECT 0x8E (Session taken over)."""
    try:
        header = await reader.readexactly(1)
        length, shift = 0, 0
        while True:
            byte = (await reader.readexactly(1))[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        connects.append(header + await reader.readexactly(length))
        writer.write(bytes([0x20, 0x03, 0x00, 0x00, 0x00]))  # CONNACK: success, no props
        await writer.drain()
        await asyncio.sleep(0.2)  # let the client settle into its session
        writer.write(bytes([0xE0, 0x02, SESSION_TAKEN_OVER, 0x00]))  # DISCONNECT 0x8E
        await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_session_taken_over_is_named_and_backed_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_pairing")
    connects: list[bytes] = []
    server = await asyncio.start_server(
        lambda r, w: _takeover_broker(r, w, connects), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    address = BrokerAddress("127.0.0.1", port)
    settings = load_settings(mqtt_client_id="svc:twin", mqtt_reconnect_max_s=0.5)
    client = make_client(
        address, settings, client_id="svc:twin", protocol="5", persistent=True, receive_maximum=10
    )
    counters: Counter[str] = Counter()
    link = MqttLink(
        client,
        Endpoint(address, "5", "svc:twin", "requests"),
        reconnect_max_s=0.5,
        counters=counters,
    )
    stop = asyncio.Event()

    async def serve(c: object) -> None:
        async for _message in client.messages:
            pass

    async def nothing(_c: object) -> None:
        return None

    task = asyncio.create_task(link.run(nothing, serve, stop))
    try:
        await wait_until(lambda: counters["takeover.requests"] == 1, 10, "the takeover")
        assert link.conflict == "mqtt client id svc:twin is used by another client"
        named = [m for m in messages(caplog) if "another client is using MQTT client id" in m]
        assert len(named) == 1, messages(caplog)
        assert "0x8E" in named[0]
        # Not 0.2 s later: the takeover backoff (at least half of TAKEOVER_FIRST_S).
        await asyncio.sleep(2.0)
        assert len(connects) == 1
        assert TAKEOVER_FIRST_S * 0.5 > 2.0
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        server.close()
        await server.wait_closed()
