"""Fixtures of the race tests: a Dispatcher of the test's own, on the engine of the test.

- `race_backend` (params `redis` / `cluster`): where the workers and the test meet.
- `race_prefix`: the test's key prefix, shared by the test and every worker.
- `race_api`: requests through a Dispatcher in the test process, with the workers'
  secret and settings (to issue codes and check the outcome).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_pairing.config import load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.store import KeySchema, PairingStore
from tests.harness.api import Api
from tests.harness.servers import RedisClusterServers, RedisServer, StoreBackend
from tests.races.support import RACE_SETTINGS
from tests.races.worker import SECRET


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),
    ]
)
def race_backend(request: pytest.FixtureRequest) -> StoreBackend:
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        return StoreBackend("cluster", cluster.url, cluster=True)
    server: RedisServer = request.getfixturevalue("redis_server")
    return StoreBackend("redis", server.url)


@pytest.fixture
def race_prefix(service_key_prefix: str) -> str:
    return service_key_prefix


@pytest.fixture
async def race_api(race_backend: StoreBackend, race_prefix: str) -> AsyncIterator[Api]:
    store = PairingStore(race_backend.client(), KeySchema(race_prefix))
    settings: dict[str, Any] = {"pairing_key_prefix": race_prefix, **RACE_SETTINGS}
    yield Api(Dispatcher(store, load_settings(**settings), SECRET))
    await store.aclose()
