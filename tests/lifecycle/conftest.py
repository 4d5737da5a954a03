"""Fixtures of the lifecycle tests: presence, session expiry, outbox and history.

From the shared harness (tests/harness/fixtures.py): `broker_address`, `peers`,
`recorder`, `service_key_prefix`. Here:

- `lc_prefix`: the Redis key prefix every service instance of the test shares (the
  harness's `service_key_prefix`); `keys` is its `KeySchema`.
- `rdb`: a sync redis-py client (decoded) on the session Redis.
- `start_service`: the harness's, with a 0.2 s sweep interval.
- `wire`: the harness's `recorder` (every event, reply and status of the test's prefix).
- `status_link`: `await status_link(runner_id, keepalive_s=2)` opens a runner's presence
  connection (Last Will offline, retained); retained statuses are cleared afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.harness.peers import Peers, StatusLink, clear_retained
from tests.harness.recorder import Recorder
from tests.harness.servers import RedisServer
from tests.harness.service import RunningService, StartService

OpenStatusLink = Callable[..., Awaitable[StatusLink]]

# Compatibility names: lifecycle tests import these from here.
__all__ = ["OpenStatusLink", "Peers", "RunningService", "StartService"]


@pytest.fixture
def lc_prefix(service_key_prefix: str) -> str:
    return service_key_prefix


@pytest.fixture
def keys(lc_prefix: str) -> KeySchema:
    return KeySchema(lc_prefix)


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def start_service(start_service: StartService) -> StartService:
    """The harness's `start_service`, sweeping every 0.2 s unless told otherwise."""

    async def start(**overrides: Any) -> RunningService:
        return await start_service(**{"pairing_sweep_interval_s": 0.2, **overrides})

    return start


@pytest.fixture
def wire(recorder: Recorder) -> Recorder:
    return recorder


@pytest.fixture
async def status_link(
    broker_address: BrokerAddress, topic_prefix: str
) -> AsyncIterator[OpenStatusLink]:
    links: list[StatusLink] = []

    async def open_link(runner_id: str, keepalive_s: int = 2) -> StatusLink:
        link = StatusLink(broker_address, topic_prefix, runner_id, keepalive_s)
        links.append(link)
        await asyncio.to_thread(link.connect)
        return link

    yield open_link
    for link in links:
        await asyncio.to_thread(link.close)
    await asyncio.to_thread(clear_retained, broker_address, sorted({x.topic for x in links}))
