"""The shared harness's fixtures (a pytest plugin, loaded by tests/conftest.py).

Servers (tests/harness/servers.py), each on a free port of 127.0.0.1:

- `redis_server` (session): `RedisServer` with `.host`, `.port`, `.url`, `.process`,
  `.start()`, `.stop()`, `.kill()`, `.restart()`, `.client()`, `.flushall()`.
- `mosquitto_broker` (session): `MosquittoBroker` (broker-config/mosquitto-test.conf: no
  authentication) with `.host`, `.port`, `.url`, `.config_path`, `.persistence_dir`,
  `.log_path`, `.process`, `.start()`, `.stop()`, `.kill()`, `.restart()`.
- `fakeredis_server` (session): `FakeRedisServer` with `.host`, `.port`, `.url`, `.server`.
- `make_redis_server`, `make_mosquitto` (function): factories for tests that need their
  own instance to kill; every instance made is stopped after the test.
- `make_shipped_mosquitto` (function): `make_shipped_mosquitto(runners=[...], apps=[...])`
  runs broker-config/mosquitto.conf as shipped (listeners moved to free ports, password
  files written by `mqtt-pairing credentials add`); see tests/security/harness.py.
- `amqtt_broker` (function): amqtt, the embedded broker, in this process on a free port
  (`.host`, `.port`, `.url`, `.address`).
- `redis_url` (function): the session Redis, flushed first.
- `store_redis_url` (function, params `redis` / `fakeredis`): a flushed URL of either.
- `redis_cluster` (session): `RedisClusterServers`, 3 masters with one replica each,
  healthy; `.url`, `.nodes`, `.masters()`, `.replicas()`, `.node_of_slot(slot)`,
  `.kill(node)`, `.wait_failover(node)`, `.revive()`, `.set_node_timeout(ms)`,
  `.client()`. Killed nodes are restarted (they rejoin as replicas) after the test.
- `store_backend` (function, params `redis` / `fakeredis` / `cluster`): a `StoreBackend`
  (`.name`, `.url`, `.cluster`, `.client()`), each flushed first.

The service and its peers (tests/harness/service.py, serve.py, peers.py, recorder.py):

- `key_prefix`, `topic_prefix` (function): unique per test, so tests never collide.
- `service_key_prefix` (function): the Redis key prefix every instance of the test shares.
- `broker_address` (function): the session Mosquitto as a `BrokerAddress`.
- `start_service` (function): `await start_service(**overrides)` runs the service
  in-process on the session Mosquitto and Redis with the test's prefixes (instances
  share `service_key_prefix`) and a client id of its own; stopped after the test.
- `serve_process` (function): `serve_process(**env)` makes a `ServeProcess` (`python -m
  mqtt_pairing serve`) with the test's prefixes, the session servers unless `env` says
  otherwise, and a free health port; every process made is killed after the test.
- `recorder` (function): a `Recorder` of every event, reply and status under the test's
  topic prefix on the session Mosquitto; fails the test if one of its checkers did.
- `mqtt_checkers` (function): the checkers `recorder` hands every payload to (none here;
  override it to validate every recorded message, e.g. against the AsyncAPI document).
- `peers` (function): `Peers` on the session Mosquitto and the test's topic prefix.

A shared server that a test stopped is started again (same port) after that test.
Missing binaries skip the test, or fail it when `CI=true`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from amqtt.broker import Broker

from mqtt_pairing.broker import start_embedded_broker
from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.peers import Peers
from tests.harness.recorder import Checker, Recorder, pairing_filters, recording
from tests.harness.serve import ServeProcess
from tests.harness.servers import (
    FakeRedisServer,
    MosquittoBroker,
    RedisClusterServers,
    RedisServer,
    StoreBackend,
    free_port,
    require_binary,
    start_with_retries,
)
from tests.harness.service import SECRET, StartService, instance_settings, instances
from tests.sdk.contract import Contract
from tests.security.certs import TestCA
from tests.security.harness import SecureBroker

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


@dataclass
class AmqttBroker:
    """amqtt running in the test's event loop."""

    host: str
    port: int
    broker: Broker

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(self.host, self.port)


@pytest.fixture
async def amqtt_broker() -> AsyncIterator[AmqttBroker]:
    """amqtt (the embedded broker, no ACL) on a free port, shut down after the test."""
    host, port = "127.0.0.1", free_port()
    broker = await start_embedded_broker(host, port)
    try:
        yield AmqttBroker(host, port, broker)
    finally:
        await broker.shutdown()


@pytest.fixture
def make_shipped_mosquitto(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SecureBroker]]:
    """Factory: `make_shipped_mosquitto(runners=[...], apps=[...], tls=ca)`, stopped after
    the test.

    Mosquitto with broker-config/mosquitto.conf, its ACLs and password files written by
    `mqtt-pairing credentials add` (`tests.security.harness.SecureBroker`); with `tls` (a
    `tests.security.certs.TestCA`) the shipped TLS listeners are enabled too.
    """
    made: list[SecureBroker] = []

    def make(
        *, runners: Iterable[str] = (), apps: Iterable[str] = (), tls: TestCA | None = None
    ) -> SecureBroker:
        binary = require_binary("mosquitto")
        require_binary("mosquitto_passwd")
        runner_ids, app_ids = list(runners), list(apps)
        broker = start_with_retries(
            lambda: SecureBroker(
                binary,
                tmp_path_factory.mktemp("mosquitto-shipped"),
                runners=runner_ids,
                apps=app_ids,
                tls=tls,
            )
        )
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def service_key_prefix() -> str:
    """The Redis key prefix shared by every service instance of the test."""
    return f"svc-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def broker_address(mosquitto_broker: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(mosquitto_broker.host, mosquitto_broker.port)


@pytest.fixture
async def start_service(
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    topic_prefix: str,
    service_key_prefix: str,
) -> AsyncIterator[StartService]:
    """Factory: `await start_service(**overrides)` runs one more instance in-process."""
    base = instance_settings(
        topic_prefix,
        service_key_prefix,
        mqtt_url=mosquitto_broker.url,
        redis_url=redis_server.url,
    )
    async with instances(base) as start:
        yield start


MakeServe = Callable[..., ServeProcess]


@pytest.fixture
def serve_process(
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    topic_prefix: str,
    service_key_prefix: str,
    tmp_path: Path,
) -> Iterator[MakeServe]:
    """Factory: `serve_process(**env)` makes (does not start) a `serve` process."""
    made: list[ServeProcess] = []

    def make(*args: str, **env: str) -> ServeProcess:
        values = {
            "MQTT_URL": mosquitto_broker.url,
            "REDIS_URL": redis_server.url,
            "PAIRING_SECRET": SECRET,
            "PAIRING_TOPIC_PREFIX": topic_prefix,
            "PAIRING_KEY_PREFIX": service_key_prefix,
            "PAIRING_SHARED_GROUP": "",
            "PAIRING_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
            "PAIRING_SHUTDOWN_GRACE_S": "2",
            "MQTT_RECONNECT_MAX_S": "1",
            "MQTT_CLIENT_ID": f"test-serve:{uuid.uuid4().hex[:12]}",
        }
        values.update(env)
        process = ServeProcess(values, tmp_path / f"serve-{len(made)}.log", args)
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill()


@pytest.fixture
def mqtt_checkers(topic_prefix: str, request: pytest.FixtureRequest) -> list[Checker]:
    """Checkers the `recorder` (and tests/service's `sniffer`) hand every payload to.

    By default every reply and event is checked against docs/asyncapi.yaml
    (tests/sdk/contract.py) unless the test is marked `no_contract`; a suite's conftest or
    a test may override it. `checker(topic, payload, properties)` raises on a bad message,
    and the test fails after it ran.
    """
    if request.node.get_closest_marker("no_contract") is not None:
        return []
    return [Contract(topic_prefix).checker]


@pytest.fixture
async def recorder(
    broker_address: BrokerAddress, topic_prefix: str, mqtt_checkers: list[Checker]
) -> AsyncIterator[Recorder]:
    """Every event, reply and runner status under the test's prefix, copies included."""
    async with recording(
        broker_address, *pairing_filters(topic_prefix), prefix=topic_prefix
    ) as recorded:
        for checker in mqtt_checkers:
            recorded.add_checker(checker)
        yield recorded
    recorded.assert_checked()


@pytest.fixture
def peers(broker_address: BrokerAddress, topic_prefix: str) -> Peers:
    """Runners and apps on the session Mosquitto and the test's topic prefix."""
    return Peers(broker_address, topic_prefix)
