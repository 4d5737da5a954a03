"""The broker connection's log lines: an unreachable broker is not a lost connection.

An unreachable `MQTT_URL` is logged as "cannot connect", never as "connection lost" (it
never connected); once Mosquitto is there and then stops, the loss is "connection lost"
and the failed attempts after it "cannot reconnect".
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from collections.abc import Callable

import pytest

from mqtt_pairing.config import load_settings
from mqtt_pairing.service import build_service
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.reliability.support import SECRET, wait_until

pytestmark = pytest.mark.timeout(90)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("mqtt_pairing")]


async def test_unreachable_broker_is_not_a_lost_connection(
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqtt_pairing")
    # Bound but not listening: connects are refused, and no server another test starts
    # meanwhile can take the port (it was seen to, with a port merely picked as free).
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    settings = load_settings(
        mqtt_url=f"mqtt://127.0.0.1:{port}",
        redis_url=redis_server.url,
        pairing_secret=SECRET,
        pairing_topic_prefix=topic_prefix,
        pairing_key_prefix=f"link-{uuid.uuid4().hex[:8]}",
        pairing_shared_group="",
        mqtt_client_id=f"link:{uuid.uuid4().hex[:8]}",
        mqtt_reconnect_max_s=0.5,
        pairing_shutdown_grace_s=1.0,
    )
    service = await build_service(settings)
    task = asyncio.create_task(service.run())
    try:
        await wait_until(
            lambda: sum("cannot connect" in m for m in messages(caplog)) >= 4,
            15,
            "attempts to reach the missing broker",
        )
        before = messages(caplog)
        assert not [m for m in before if "lost" in m], before
        line = next(m for m in before if "cannot connect" in m)
        assert f"127.0.0.1:{port}" in line
        assert "refused" in line

        holder.close()
        broker = make_mosquitto(port=port)
        await wait_until(service.gateway.connected.is_set, 15, "the service to connect")
        # Both connections up (the presence one has its own), so that each later line
        # is about a reconnect.
        await wait_until(
            lambda: any(m.startswith("presence connection up") for m in messages(caplog)),
            15,
            "the presence connection",
        )
        await asyncio.to_thread(broker.stop)
        await wait_until(
            lambda: any("cannot reconnect" in m for m in messages(caplog)),
            15,
            "a failed reconnect",
        )
        after = messages(caplog)[len(before) :]
        assert any(m.startswith("broker connection lost (requests connection") for m in after)
        assert not any("cannot connect" in m for m in after), after
    finally:
        holder.close()
        service.stop()
        await asyncio.wait_for(task, 15)
        await service.close()
