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

from mqtt_pairing.config import load_settings
from mqtt_pairing.gateway import BrokerAddress
from mqtt_pairing.service import build_service
from tests.fixtures import MosquittoBroker, RedisServer
from tests.service.support import (
    SECRET,
    Peers,
    RunningService,
    Sniffer,
    StartService,
    sniffing,
    start_running,
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
    """Factory: `await start_service(**overrides)` runs a service on Mosquitto + Redis."""
    started: list[RunningService] = []

    async def start(**overrides: Any) -> RunningService:
        unique = uuid.uuid4().hex[:12]
        values: dict[str, Any] = {
            "mqtt_url": mosquitto_broker.url,
            "redis_url": redis_server.url,
            "pairing_secret": SECRET,
            "pairing_topic_prefix": topic_prefix,
            "pairing_key_prefix": f"e2e-{unique}",
            "mqtt_client_id": f"svc-{unique}",
            "pairing_shared_group": "",
            "pairing_shutdown_grace_s": 2.0,
            "mqtt_reconnect_max_s": 1.0,
        }
        values.update(overrides)
        service = await build_service(load_settings(**values))
        running = await start_running(service, broker_address, topic_prefix)
        started.append(running)
        return running

    yield start
    errors: list[Exception] = []
    for running in reversed(started):
        try:
            await running.stop()
        except Exception as exc:  # stop the others first, then report
            errors.append(exc)
    if errors:
        raise errors[0]


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
