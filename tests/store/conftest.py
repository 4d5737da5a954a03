"""Fixtures of the store tests: a PairingStore and Dispatchers on `store_backend`.

Every test that uses them runs three times: on a real redis-server, on fakeredis and on a
Redis Cluster (3 masters with a replica each; `client` is then the service's own
`RedisCluster`, so plain commands of a test go to the node of their key's slot).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from mqtt_pairing.config import load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.store import KeySchema, PairingStore
from tests.harness.servers import StoreBackend
from tests.store.helpers import SECRET, Api


@pytest.fixture
def prefix(key_prefix: str) -> str:
    """The unique key prefix of the test, without its trailing colon (KeySchema adds it)."""
    return key_prefix.rstrip(":")


@pytest.fixture
async def client(store_backend: StoreBackend) -> AsyncIterator[aioredis.Redis]:
    client = store_backend.client()
    yield client
    await client.aclose()


@pytest.fixture
def store(client: aioredis.Redis, prefix: str) -> PairingStore:
    return PairingStore(client, KeySchema(prefix))


@pytest.fixture
def make_api(store: PairingStore, prefix: str) -> Callable[..., Api]:
    """`make_api(**settings)`: an Api over a Dispatcher with these settings on top."""

    def make(**overrides: Any) -> Api:
        settings = load_settings(pairing_key_prefix=prefix, **overrides)
        return Api(Dispatcher(store, settings, SECRET))

    return make


@pytest.fixture
def api(make_api: Callable[..., Api]) -> Api:
    """An Api with the default settings."""
    return make_api()
