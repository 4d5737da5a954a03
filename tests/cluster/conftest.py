"""Fixtures of the Redis Cluster tests: the service on Mosquitto + the session cluster.

- `cluster_prefix` (function): a key prefix unique to the test, shared by every service
  instance and store the test makes (instances must agree on their keys).
- `cluster_store` (function): a `PairingStore` over `connect_redis(url, cluster=True)`.
- `start_cluster_service` (function): `await start_cluster_service(**overrides)` builds
  the service with `REDIS_CLUSTER_URL` set to the session cluster and `MQTT_URL` to the
  session Mosquitto, runs it in a task and waits until it is connected; every instance is
  stopped after the test. Each gets its own `mqtt_client_id`.
- `swarm`: many runners and apps over one MQTT connection (tests/cluster/support.py).

`peers` and `broker_address` are the shared harness's (tests/harness/fixtures.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from tests.cluster.support import Swarm
from tests.harness.servers import MosquittoBroker, RedisClusterServers
from tests.harness.service import StartService, instance_settings, instances


@pytest.fixture
def cluster_prefix() -> str:
    return f"cl-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def cluster_store(
    redis_cluster: RedisClusterServers, cluster_prefix: str
) -> AsyncIterator[PairingStore]:
    store = PairingStore(
        connect_redis(redis_cluster.url, timeout_s=5.0, cluster=True), KeySchema(cluster_prefix)
    )
    await store.ping()  # learns every node now: the URL's node may be killed later
    yield store
    await store.aclose()


@pytest.fixture
async def start_cluster_service(
    broker_address: BrokerAddress,
    mosquitto_broker: MosquittoBroker,
    redis_cluster: RedisClusterServers,
    topic_prefix: str,
    cluster_prefix: str,
) -> AsyncIterator[StartService]:
    """Factory: `await start_cluster_service(**overrides)` runs one more instance."""
    base = instance_settings(
        topic_prefix,
        cluster_prefix,
        mqtt_url=mosquitto_broker.url,
        redis_cluster_url=redis_cluster.url,
    )
    async with instances(base) as start:
        yield start


@pytest.fixture
async def swarm(broker_address: BrokerAddress, topic_prefix: str) -> AsyncIterator[Swarm]:
    async with Swarm(broker_address, topic_prefix) as swarm:
        yield swarm
