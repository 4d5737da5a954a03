"""A `pair` is never refused RUNNER_OFFLINE on a stale record (docs/protocol.md "Presence").

Mosquitto publishes every client's Last Will when it shuts down, and the service's
presence connection records them before it closes: after a broker restart, runners that
came back with it are recorded offline until the presence connection is up again and has
read their retained `online`. The requests connection may be back first (its reconnect
backoff is its own); a `pair` it takes meanwhile must wait for the runner's record to be
refreshed, not answer from the stale one.

The presence connection's reading is held back here by the test (its reconnect is real),
so that the pair deterministically arrives while the record is stale.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import aiomqtt
import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.harness.service import instance_settings, instances
from tests.sdk.support import sdk_peers

pytestmark = pytest.mark.timeout(60)


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout_s} s: {what}") from None


async def test_pair_after_a_broker_restart_waits_for_the_runners_presence(
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    topic_prefix: str,
) -> None:
    broker = make_mosquitto()
    address = BrokerAddress(broker.host, broker.port)
    base = instance_settings(topic_prefix, f"stale-{uuid.uuid4().hex[:8]}")
    async with instances(base) as start, sdk_peers(address, topic_prefix) as sdk:
        running = await start(mqtt_url=broker.url, redis_url=redis_server.url)
        presence = running.service.gateway.presence
        async with sdk.runner() as runner, sdk.app() as app:
            await runner.request_code()

            # The next presence connection reads nothing until `reading` is set.
            reading = asyncio.Event()
            read = presence._read

            def held(client: aiomqtt.Client) -> Coroutine[Any, Any, None]:
                async def wait_then_read() -> None:
                    await reading.wait()
                    await read(client)

                return wait_then_read()

            presence._read = held  # type: ignore[method-assign]

            await asyncio.to_thread(broker.stop)  # publishes the runner's Will: offline
            await asyncio.to_thread(broker.start)
            await wait_for(running.service.gateway.connected.is_set, "the requests connection")
            # The runner is back and has said `online` again (on connect, before any call).
            code = await runner.request_code(timeout_s=30)
            assert not presence._current, "the test needs a stale record"

            pairing = asyncio.create_task(app.pair(code.code, timeout_s=30))
            await wait_for(
                lambda: bool(presence._refresh_waiters) or pairing.done(),
                "the pair to wait for the runner's presence",
            )
            assert not pairing.done(), pairing.result()  # not refused from the stale record
            reading.set()
            paired = await pairing
            assert paired.session.runner_id == runner.id

            status = await app.status()
            assert status.runners[0].online is True
