"""Helpers of the lifecycle tests (presence, expiry, outbox, history).

Everything here talks to the real Mosquitto and Redis of the test session:

- `run_service`: a service built by `build_service` and run in a task of the test's
  event loop; `stop()` is bounded.
- `Wire`: a raw MQTT 5 client that records every event and reply of a topic prefix, with
  no deduplication, so tests can count copies (a client drops repeated `event_id`s).
- `StatusLink`: a runner's presence connection (paho, its own network thread) with a
  retained Last Will `{"state":"offline"}` and a short keepalive; it can publish its
  status, disconnect cleanly, go silent (keepalive timeout) or reset its socket (crash).
- Redis helpers: Redis time, backdating a session's `last_seen_at_ms`, making its expiry
  due, reading history streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiomqtt
import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.service import Service
from mqtt_pairing.store.keys import KeySchema
from tests.service.support import RunningService, start_running

SECRET = "l" * 40
CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 5.0
EVENT_TIMEOUT_S = 5.0
MASK_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]\*\*-\*\*\*-\*\*\* #[0-9a-f]{8}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse_ts(value: str) -> datetime:
    """An RFC 3339 UTC timestamp with milliseconds, as the protocol writes them."""
    assert TIMESTAMP_RE.fullmatch(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# ---- the service in-process --------------------------------------------------------------


async def run_service(service: Service) -> RunningService:
    """Run `service` in a task and wait (bounded) until it is connected and subscribed."""
    gateway = service.gateway
    return await start_running(service, gateway.address, gateway.settings.pairing_topic_prefix)


async def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02
) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_statuses(services: list[RunningService], count: int, timeout_s: float = 5.0):
    """Wait until the services together have recorded `count` status messages.

    With a shared group one instance at a time (the presence lease holder) records them;
    a single service records them all.
    """
    await wait_until(
        lambda: sum(s.counters["status"] for s in services) >= count,
        timeout_s,
        f"{count} status message(s) recorded by {len(services)} service(s) together",
    )


async def wait_presence_holder(service: RunningService, timeout_s: float = 5.0) -> None:
    """Wait until `service` holds the presence lease (records runners' status)."""
    await wait_until(
        lambda: service.service.gateway.records_presence,
        timeout_s,
        "the service to hold the presence lease",
    )


# ---- the wire ----------------------------------------------------------------------------


@dataclass
class Seen:
    """One message the `Wire` received."""

    topic: str
    body: dict[str, Any]
    at: float


@dataclass
class Wire:
    """Every event, reply and runner status under one prefix, in arrival order, copies too."""

    prefix: str
    client: aiomqtt.Client
    seen: list[Seen] = field(default_factory=list)

    async def read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            raw = payload.encode() if isinstance(payload, str) else payload
            try:
                body = json.loads(bytes(raw)) if isinstance(raw, bytes | bytearray) else None
            except ValueError:
                body = None
            if isinstance(body, dict):
                self.seen.append(Seen(message.topic.value, body, time.monotonic()))

    def events_topic(self, kind: Literal["runner", "app"], ident: str) -> str:
        return f"{self.prefix}/{kind}s/{ident}/events"

    def events(
        self, kind: Literal["runner", "app"], ident: str, name: str | None = None
    ) -> list[dict[str, Any]]:
        """Events received on one party's events topic (optionally of one kind)."""
        topic = self.events_topic(kind, ident)
        return [
            m.body
            for m in self.seen
            if m.topic == topic and (name is None or m.body.get("event") == name)
        ]

    def presence_events(self, app_id: str, *, copies: bool = False) -> list[dict[str, Any]]:
        """`runner.online` / `runner.offline` events an app received, in order.

        The outbox may publish an event twice (docs/design.md "Delivery": never lost, maybe
        repeated); a copy carries the same `event_id` and clients drop it. So by default a
        copy is dropped here too, after checking it is identical to the first; with
        `copies` every message on the wire counts.
        """
        got = [e for e in self.events("app", app_id) if e.get("event", "").startswith("runner.")]
        if copies:
            return got
        first: dict[str, dict[str, Any]] = {}
        for event in got:
            seen = first.setdefault(event["event_id"], event)
            assert seen == event, f"two events with one event_id differ: {seen} / {event}"
        return list(first.values())

    def all_events(self) -> list[dict[str, Any]]:
        return [m.body for m in self.seen if m.topic.endswith("/events")]

    def statuses(self, runner_id: str) -> list[Seen]:
        """Status messages (the Last Will included) seen on a runner's status topic."""
        topic = f"{self.prefix}/runners/{runner_id}/status"
        return [m for m in self.seen if m.topic == topic]

    def replies(self, kind: Literal["runner", "app"], ident: str, op: str) -> list[dict[str, Any]]:
        topic = f"{self.prefix}/{kind}s/{ident}/res/{op}"
        return [m.body for m in self.seen if m.topic == topic]

    async def barrier(self, timeout_s: float = REPLY_TIMEOUT_S) -> None:
        """Wait until everything the service published before now has reached the wire.

        Asks the service something (a `sessions` request of a runner of its own) and waits
        for the reply here: MQTT keeps one connection's messages in order, and the service
        publishes replies and events on one connection. With several instances, only the
        one that answers is covered.
        """
        ident = f"barrier-{uuid.uuid4().hex[:8]}"
        request_id = uuid.uuid4().hex
        topic = f"{self.prefix}/runners/{ident}/req/sessions"
        await self.client.publish(topic, json.dumps({"request_id": request_id}), qos=1)
        await wait_until(
            lambda: any(
                r.get("request_id") == request_id for r in self.replies("runner", ident, "sessions")
            ),
            timeout_s,
            "the reply to the barrier request",
        )

    async def wait_events(
        self,
        kind: Literal["runner", "app"],
        ident: str,
        name: str,
        count: int = 1,
        timeout_s: float = EVENT_TIMEOUT_S,
    ) -> list[dict[str, Any]]:
        """Wait until `count` distinct events `name` (by event_id) have arrived for one
        party; return everything received of that name (copies included)."""

        def distinct() -> int:
            return len({e.get("event_id") for e in self.events(kind, ident, name)})

        await wait_until(
            lambda: distinct() >= count, timeout_s, f"{count} {name} event(s) for {kind} {ident}"
        )
        return self.events(kind, ident, name)


@contextlib.asynccontextmanager
async def wire_for(address: BrokerAddress, prefix: str) -> AsyncIterator[Wire]:
    """A `Wire` subscribed (QoS 1) to all events, replies and statuses under `prefix`."""
    client = aiomqtt.Client(
        address.host,
        address.port,
        identifier=f"wire-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[NODELAY],
        timeout=10,
    )
    async with client:
        wire = Wire(prefix, client)
        await client.subscribe(f"{prefix}/+/+/events", qos=1)
        await client.subscribe(f"{prefix}/+/+/res/+", qos=1)
        await client.subscribe(f"{prefix}/runners/+/status", qos=1)
        reader = asyncio.create_task(wire.read())
        try:
            yield wire
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


# ---- a runner's presence connection -----------------------------------------------------

OFFLINE = json.dumps({"state": "offline"}).encode()


class StatusLink:
    """A runner's presence connection: retained status and Last Will, paho network thread.

    The broker sees it as the runner (anonymous test broker); the service only looks at
    the topic `P/runners/{id}/status`.
    """

    def __init__(self, address: BrokerAddress, prefix: str, runner_id: str, keepalive_s: int):
        self.topic = f"{prefix}/runners/{runner_id}/status"
        self.keepalive_s = keepalive_s
        self.address = address
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"status-{runner_id}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.will_set(self.topic, OFFLINE, qos=1, retain=True)
        self.dropped_at: float | None = None
        self._looping = False

    def connect(self) -> None:
        """Connect and start the network thread (blocking; call via `to_thread`)."""
        self.client.connect(self.address.host, self.address.port, keepalive=self.keepalive_s)
        self.client.loop_start()
        self._looping = True
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("status link did not connect")
            time.sleep(0.01)

    def publish(self, state: Literal["online", "offline"]) -> None:
        """Publish the retained status and wait for its PUBACK (blocking)."""
        info = self.client.publish(self.topic, json.dumps({"state": state}), qos=1, retain=True)
        info.wait_for_publish(REPLY_TIMEOUT_S)
        assert info.is_published()

    def disconnect(self) -> None:
        """A clean DISCONNECT: the broker discards the Will (blocking)."""
        self.client.disconnect()
        self.client.loop_stop()
        self._looping = False

    def go_silent(self) -> None:
        """Stop the network thread without a DISCONNECT: no more PINGREQ, socket open.

        The broker disconnects the client after keepalive x 1.5 and publishes its Will.
        """
        self.client.loop_stop()
        self._looping = False
        self.dropped_at = time.monotonic()

    def reset(self) -> None:
        """Drop the TCP connection with a RST (as a crashed process would): no DISCONNECT."""
        self.client.loop_stop()
        self._looping = False
        sock = self.client.socket()
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.dropped_at = time.monotonic()
        sock.close()

    def close(self) -> None:
        """Release the client whatever state it is in (teardown)."""
        if self._looping:
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client.loop_stop()
            self._looping = False
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def clear_retained(address: BrokerAddress, topics: list[str]) -> None:
    """Delete retained messages (zero-length retained publish), so tests leave none behind."""
    if not topics:
        return
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"clear-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.connect(address.host, address.port, keepalive=10)
    client.loop_start()
    try:
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(REPLY_TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()


# ---- pairing -----------------------------------------------------------------------------


async def pair_apps(runner: RunnerClient, *apps: AppClient) -> list[dict[str, Any]]:
    """Pair every app with `runner` through one code; return the sessions (reply order)."""
    code = (await runner.request_code(max_uses=len(apps)))["code"]
    sessions = []
    for app in apps:
        sessions.append((await app.pair(code))["session"])
    return sessions


# ---- Redis -------------------------------------------------------------------------------


def redis_now_ms(rdb: redis.Redis) -> int:
    """Redis time in ms (the service takes its time from Redis, never the host)."""
    secs, micros = rdb.time()
    return int(secs) * 1000 + int(micros) // 1000


def session_json(rdb: redis.Redis, keys: KeySchema, runner_id: str, session_id: str) -> dict:
    raw = rdb.hget(keys.runner_sessions(runner_id), session_id)
    assert raw is not None, f"session {session_id} is not active in Redis"
    return dict(json.loads(raw))


def backdate_session(
    rdb: redis.Redis, keys: KeySchema, runner_id: str, session_id: str, by_ms: int
) -> int:
    """Move a session's `last_seen_at_ms` `by_ms` into the past; returns the new value.

    Its expiry-set deadline is left alone (still in the future), so the sweep does not look
    at it until `make_expiry_due`.
    """
    s = session_json(rdb, keys, runner_id, session_id)
    s["last_seen_at_ms"] = redis_now_ms(rdb) - by_ms
    rdb.hset(keys.runner_sessions(runner_id), session_id, json.dumps(s))
    return int(s["last_seen_at_ms"])


def expiry_member(runner_id: str, session_id: str) -> str:
    return f"{runner_id}\n{session_id}"


def expiry_key(keys: KeySchema, session_id: str, shards: int = 1) -> str:
    return keys.expiry(keys.shard_of(session_id, shards))


def make_expiry_due(rdb: redis.Redis, keys: KeySchema, runner_id: str, session_id: str) -> None:
    """Make a session's idle deadline in the expiry set come due now."""
    key = expiry_key(keys, session_id)
    member = expiry_member(runner_id, session_id)
    assert rdb.zscore(key, member) is not None, "the session is not in the expiry set"
    rdb.zadd(key, {member: redis_now_ms(rdb) - 1})


def history(rdb: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """All entries of a history stream, oldest first."""
    return [(str(i), dict(f)) for i, f in rdb.xrange(key, "-", "+")]
