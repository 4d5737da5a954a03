"""The test servers start, answer and restart as the rest of the suite expects."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.harness.servers import (
    MAX_PORT,
    FakeRedisServer,
    MosquittoBroker,
    RedisServer,
    free_port,
    port_is_open,
    require_binary,
)

TIME_SCRIPT = "return redis.call('TIME')[1]"


class _PahoClient:
    """A paho-mqtt 2 client with a network thread and a queue of received messages."""

    def __init__(
        self, broker: MosquittoBroker, client_id: str, *, session_expiry_s: int = 0
    ) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed: queue.Queue[list[ReasonCode]] = queue.Queue()
        self.connected: queue.Queue[ReasonCode] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda _c, _u, _f, rc, _p: self.connected.put(rc)
        self.client.on_subscribe = lambda _c, _u, _m, rcs, _p: self.subscribed.put(rcs)
        self.client.on_message = lambda _c, _u, message: self.messages.put(message)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = session_expiry_s
        self.client.connect(
            broker.host,
            broker.port,
            keepalive=10,
            clean_start=session_expiry_s == 0,
            properties=properties,
        )
        self.client.loop_start()
        assert not self.connected.get(timeout=5).is_failure

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_free_port_is_bindable_and_below_cluster_limit() -> None:
    port = free_port()
    assert 0 < port < MAX_PORT
    assert port not in {1883, 6379}
    assert not port_is_open("127.0.0.1", port)
    assert free_port() != port
    cluster_port = free_port(with_cluster_bus=True)
    assert cluster_port + 10000 <= 65535


def test_require_binary_finds_sbin_and_refuses_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("definitely-not-a-binary-" + uuid.uuid4().hex[:8])
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="not found"):
        require_binary("definitely-not-a-binary-" + uuid.uuid4().hex[:8])


def test_redis_server_answers_ping(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port not in {6379}
    with redis.Redis.from_url(redis_server.url) as client:
        assert client.ping()


def test_redis_server_restarts_on_the_same_port(
    make_redis_server: Callable[..., RedisServer],
) -> None:
    server = make_redis_server()
    port = server.port
    server.stop()
    assert not server.running
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(server.url) as client:
        client.ping()
    server.start()
    assert server.port == port
    with redis.Redis.from_url(server.url) as client:
        assert client.ping()


def test_redis_url_is_flushed(redis_url: str, key_prefix: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set(f"{key_prefix}x", "1", ex=60)
        assert client.get(f"{key_prefix}x") == b"1"


def test_mosquitto_round_trip_at_qos1_survives_restart(
    make_mosquitto: Callable[..., MosquittoBroker],
) -> None:
    broker = make_mosquitto()
    topic = f"pairing-test-{uuid.uuid4().hex[:8]}/echo"
    payload = b"x" * 5000  # above 4096 bytes: the test broker must not cap packets

    subscriber = _PahoClient(broker, f"sub-{uuid.uuid4().hex[:8]}")
    publisher = _PahoClient(broker, f"pub-{uuid.uuid4().hex[:8]}")
    try:
        subscriber.client.subscribe(topic, qos=1)
        assert subscriber.subscribed.get(timeout=5)[0].value == 1  # granted QoS 1
        publisher.client.publish(topic, payload, qos=1).wait_for_publish(timeout=5)
        message = subscriber.messages.get(timeout=5)
        assert (message.topic, message.payload, message.qos) == (topic, payload, 1)
    finally:
        subscriber.close()
        publisher.close()

    port = broker.port
    broker.restart()
    assert broker.port == port
    assert (broker.persistence_dir / "mosquitto.db").exists()

    again = _PahoClient(broker, f"again-{uuid.uuid4().hex[:8]}")
    again.close()


def test_mosquitto_keeps_queued_qos1_messages_across_restart(
    make_mosquitto: Callable[..., MosquittoBroker],
) -> None:
    broker = make_mosquitto()
    topic = f"pairing-test-{uuid.uuid4().hex[:8]}/queued"
    subscriber_id = f"persistent-{uuid.uuid4().hex[:8]}"

    subscriber = _PahoClient(broker, subscriber_id, session_expiry_s=300)
    subscriber.client.subscribe(topic, qos=1)
    subscriber.subscribed.get(timeout=5)
    subscriber.close()

    publisher = _PahoClient(broker, f"pub-{uuid.uuid4().hex[:8]}")
    publisher.client.publish(topic, b"while-offline", qos=1).wait_for_publish(timeout=5)
    publisher.close()

    broker.restart()  # graceful: mosquitto saves sessions and queued messages

    subscriber = _PahoClient(broker, subscriber_id, session_expiry_s=300)
    try:
        message = subscriber.messages.get(timeout=5)
        assert (message.topic, message.payload) == (topic, b"while-offline")
    finally:
        subscriber.close()


def test_shared_mosquitto_accepts_connections(mosquitto_broker: MosquittoBroker) -> None:
    assert mosquitto_broker.port != 1883
    assert "set_tcp_nodelay true" in mosquitto_broker.config_path.read_text()
    client = _PahoClient(mosquitto_broker, f"shared-{uuid.uuid4().hex[:8]}")
    client.close()


def test_fakeredis_server_runs_lua(fakeredis_server: FakeRedisServer) -> None:
    with redis.Redis.from_url(fakeredis_server.url) as client:
        assert client.ping()
        seconds = int(client.eval(TIME_SCRIPT, 0))
        assert seconds > 1_700_000_000


def test_store_redis_url_serves_both_engines(store_redis_url: str, key_prefix: str) -> None:
    with redis.Redis.from_url(store_redis_url) as client:
        assert client.dbsize() == 0
        sha = client.script_load(TIME_SCRIPT)
        assert int(client.evalsha(sha, 0)) > 1_700_000_000
        client.hset(f"{key_prefix}{{runner:r1}}", mapping={"a": "1"})
        assert client.hgetall(f"{key_prefix}{{runner:r1}}") == {b"a": b"1"}
