"""Shared fixtures: real Redis, real Mosquitto and fakeredis, each on a free port.

Fixtures (see `tests/fixtures.py` for the server classes):

- `redis_server` (session): `RedisServer` with `.host`, `.port`, `.url`, `.process`,
  `.start()`, `.stop()`, `.kill()`, `.restart()`, `.client()`, `.flushall()`.
- `mosquitto_broker` (session): `MosquittoBroker` with `.host`, `.port`, `.url`,
  `.config_path`, `.persistence_dir`, `.log_path`, `.process`, `.start()`, `.stop()`,
  `.kill()`, `.restart()`.
- `fakeredis_server` (session): `FakeRedisServer` with `.host`, `.port`, `.url`, `.server`.
- `make_redis_server`, `make_mosquitto` (function): factories for tests that need their
  own instance to kill; every instance made is stopped after the test.
- `redis_url` (function): the session Redis, flushed first.
- `store_redis_url` (function, params `redis` / `fakeredis`): a flushed URL of either, for
  tests that need a URL (tests/cli); tests/store uses `store_backend` below.
- `redis_cluster` (session): `RedisClusterServers`, 3 masters with one replica each on
  free ports (< 55536: the bus is port + 10000), formed with `redis-cli --cluster create`
  and healthy (`cluster_state:ok` everywhere, replicas in sync); `.url` (any node will do
  for `RedisCluster`), `.nodes`, `.masters()`, `.replicas()`, `.node_of_slot(slot)`,
  `.kill(node)`, `.wait_failover(node)`, `.revive()`, `.set_node_timeout(ms)`,
  `.client()` (sync RedisCluster).
  Killed nodes are restarted (they rejoin as replicas) after the test.
- `store_backend` (function, params `redis` / `fakeredis` / `cluster`): a
  `tests.fixtures.StoreBackend` (`.name`, `.url`, `.cluster`, `.client()` -> redis-py
  asyncio client, the service's `RedisCluster` for the cluster); tests that build their
  client with `store_backend.client()` run on all three. Each is flushed first (the
  cluster: every master).
- `key_prefix`, `topic_prefix` (function): unique per test, so tests never collide.

A shared server that a test stopped is started again (same port) after that test.
Missing binaries skip the test, or fail it when `CI=true`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures import (
    FakeRedisServer,
    MosquittoBroker,
    RedisClusterServers,
    RedisServer,
    StoreBackend,
    require_binary,
    start_with_retries,
)

_REDIS_FIXTURES = frozenset({"redis_server", "make_redis_server", "redis_url", "redis_cluster"})
_MOSQUITTO_FIXTURES = frozenset({"mosquitto_broker", "make_mosquitto"})

# Session-scoped servers, revived after a test that stopped one of them.
_shared_servers: list[RedisServer | MosquittoBroker | RedisClusterServers] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by the real servers they use, so `-m "not mosquitto"` works."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & _REDIS_FIXTURES:
            item.add_marker(pytest.mark.redis)
        if names & _MOSQUITTO_FIXTURES:
            item.add_marker(pytest.mark.mosquitto)


@pytest.fixture(autouse=True)
def _revive_shared_servers() -> Iterator[None]:
    yield
    for server in _shared_servers:
        if not server.running:
            server.start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = require_binary("redis-server")
    server = start_with_retries(
        lambda: RedisServer(binary, tmp_path_factory.mktemp("redis-session"))
    )
    _shared_servers.append(server)
    yield server
    _shared_servers.remove(server)
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """3 masters + 3 replicas, healthy; started once per session (about 2.5 s)."""
    server_binary = require_binary("redis-server")
    cli_binary = require_binary("redis-cli")
    cluster = start_with_retries(
        lambda: RedisClusterServers(
            server_binary, cli_binary, tmp_path_factory.mktemp("redis-cluster")
        )
    )
    _shared_servers.append(cluster)
    yield cluster
    _shared_servers.remove(cluster)
    cluster.stop()


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    binary = require_binary("mosquitto")
    broker = start_with_retries(
        lambda: MosquittoBroker(binary, tmp_path_factory.mktemp("mosquitto-session"))
    )
    _shared_servers.append(broker)
    yield broker
    _shared_servers.remove(broker)
    broker.stop()


@pytest.fixture(scope="session")
def fakeredis_server() -> Iterator[FakeRedisServer]:
    server = start_with_retries(FakeRedisServer)
    yield server
    server.stop()


@pytest.fixture
def make_redis_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisServer]]:
    """Factory: `make_redis_server(extra_args=[...])` starts a private redis-server."""
    made: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        binary = require_binary("redis-server")
        server = start_with_retries(
            lambda: RedisServer(binary, tmp_path_factory.mktemp("redis"), **kwargs)
        )
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def make_mosquitto(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., MosquittoBroker]]:
    """Factory: `make_mosquitto(extra_config="...")` starts a private mosquitto."""
    made: list[MosquittoBroker] = []

    def make(**kwargs: Any) -> MosquittoBroker:
        binary = require_binary("mosquitto")
        broker = start_with_retries(
            lambda: MosquittoBroker(binary, tmp_path_factory.mktemp("mosquitto"), **kwargs)
        )
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session redis-server, flushed before the test."""
    redis_server.flushall()
    return redis_server.url


@pytest.fixture(
    params=[pytest.param("redis", marks=pytest.mark.redis), "fakeredis"],
)
def store_redis_url(request: pytest.FixtureRequest) -> str:
    """A flushed Redis URL: real redis-server, then fakeredis (same tests, both engines)."""
    name = "redis_server" if request.param == "redis" else "fakeredis_server"
    server: RedisServer | FakeRedisServer = request.getfixturevalue(name)
    server.flushall()
    return server.url


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        "fakeredis",
        pytest.param("cluster", marks=pytest.mark.redis),
    ],
)
def store_backend(request: pytest.FixtureRequest) -> StoreBackend:
    """The store tests' engine: real redis-server, fakeredis, then Redis Cluster.

    Every engine is flushed first (on the cluster: every master).
    """
    if request.param == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        cluster.flushall()
        return StoreBackend("cluster", cluster.url, cluster=True)
    name = "redis_server" if request.param == "redis" else "fakeredis_server"
    server: RedisServer | FakeRedisServer = request.getfixturevalue(name)
    server.flushall()
    return StoreBackend(request.param, server.url)


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix unique to this test (no braces: hash tags come after it)."""
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def topic_prefix() -> str:
    """An MQTT topic prefix unique to this test (one level, no wildcards)."""
    return f"pairing-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def broker_config_dir() -> Path:
    """The repository's `broker-config/` directory."""
    return Path(__file__).resolve().parent.parent / "broker-config"
