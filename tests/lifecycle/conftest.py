"""Fixtures of the lifecycle tests: presence, session expiry, outbox and history.

- `broker_address`: the session Mosquitto as a `BrokerAddress`.
- `lc_prefix`: a Redis key prefix unique to the test, shared by every service instance
  the test starts (so two instances share state); `keys` is its `KeySchema`.
- `rdb`: a sync redis-py client (decoded) on the session Redis.
- `start_service`: `await start_service(**setting_overrides)` runs a service on the session
  Mosquitto and Redis with the test's topic prefix, `lc_prefix` and a unique client id;
  all are stopped after the test, with timeouts.
- `wire`: a `Wire` recording every event and reply under the test's topic prefix.
- `peers`: makes `RunnerClient` / `AppClient` (use them with `async with`).
- `status_link`: `await status_link(runner_id, keepalive_s=2)` opens a runner's presence
  connection (Last Will offline, retained); retained statuses are cleared afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.fixtures import MosquittoBroker, RedisServer
from tests.lifecycle.support import (
    RunningService,
    StatusLink,
    Wire,
    clear_retained,
    wire_for,
)
from tests.service.support import instance_settings, instances

StartService = Callable[..., Awaitable[RunningService]]
OpenStatusLink = Callable[..., Awaitable[StatusLink]]


@pytest.fixture
def broker_address(mosquitto_broker: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(mosquitto_broker.host, mosquitto_broker.port)


@pytest.fixture
def lc_prefix() -> str:
    return f"lc-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(lc_prefix: str) -> KeySchema:
    return KeySchema(lc_prefix)


@pytest.fixture
def rdb(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client(decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def start_service(
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    topic_prefix: str,
    lc_prefix: str,
) -> AsyncIterator[StartService]:
    base = instance_settings(
        topic_prefix,
        lc_prefix,
        mqtt_url=mosquitto_broker.url,
        redis_url=redis_server.url,
        pairing_sweep_interval_s=0.2,
    )
    async with instances(base) as start:
        yield start


@pytest.fixture
async def wire(broker_address: BrokerAddress, topic_prefix: str) -> AsyncIterator[Wire]:
    async with wire_for(broker_address, topic_prefix) as recorder:
        yield recorder


class Peers:
    """Makes runners and apps on the test's broker and prefix."""

    def __init__(self, address: BrokerAddress, prefix: str) -> None:
        self.address = address
        self.prefix = prefix

    def runner(self, ident: str, **kwargs: Any) -> RunnerClient:
        return RunnerClient(ident, self.address, prefix=self.prefix, **kwargs)

    def app(self, ident: str, **kwargs: Any) -> AppClient:
        return AppClient(ident, self.address, prefix=self.prefix, **kwargs)


@pytest.fixture
def peers(broker_address: BrokerAddress, topic_prefix: str) -> Peers:
    return Peers(broker_address, topic_prefix)


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
