"""Fixtures for the end-to-end tests: the service on real Mosquitto + Redis, and its peers.

- `start_service` (function): an async factory, `await start_service(**overrides)`
  (setting names in lower case), that builds the service against the session Mosquitto
  and Redis with the test's topic prefix and a unique key prefix and client id, runs it
  in a task and waits (10 s at most) until it is connected. Every service started is
  stopped and closed after the test, with timeouts.
- `running_service`: one such service with the default test settings.
- `peers`: makes `RunnerClient` / `AppClient` for the test's prefix (`async with`).
- `sniffer`: a raw MQTT 5 client subscribed to `#` on the session broker.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.fixtures import MosquittoBroker, RedisServer
from tests.service.support import (
    Peers,
    RunningService,
    Sniffer,
    StartService,
    instance_settings,
    instances,
    sniffing,
)


@pytest.fixture
def broker_address(mosquitto_broker: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(mosquitto_broker.host, mosquitto_broker.port)


@pytest.fixture
async def start_service(
    broker_address: BrokerAddress,
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    topic_prefix: str,
) -> AsyncIterator[StartService]:
    """Factory: `await start_service(**overrides)` runs a service on Mosquitto + Redis.

    Each instance has a key prefix of its own unless told otherwise: two instances share
    the broker and topics but not their Redis state.
    """
    base = instance_settings(
        topic_prefix, "", mqtt_url=mosquitto_broker.url, redis_url=redis_server.url
    )
    async with instances(base) as start:

        async def start_apart(**overrides: Any) -> RunningService:
            own = {"pairing_key_prefix": f"e2e-{uuid.uuid4().hex[:12]}"}
            return await start(**{**own, **overrides})

        yield start_apart


@pytest.fixture
async def running_service(start_service: StartService) -> RunningService:
    """A service with the default test settings (no shared group), connected."""
    return await start_service()


@pytest.fixture
def peers(broker_address: BrokerAddress, topic_prefix: str) -> Peers:
    return Peers(broker_address, topic_prefix)


@pytest.fixture
async def sniffer(broker_address: BrokerAddress) -> AsyncIterator[Sniffer]:
    """A raw MQTT 5 client recording everything (`#`) on the session broker."""
    async with sniffing(broker_address, "#") as sniff:
        yield sniff
