"""Helpers of the end-to-end tests: a running service, peers, a raw MQTT sniffer.

The fixtures that use them live in `tests/service/conftest.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiomqtt
import pytest

from mqtt_pairing.client import AppClient, PairingClient, RunnerClient
from mqtt_pairing.config import Settings, load_settings
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.service import Service, build_service

SECRET = "x" * 40
CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 5.0
EVENT_TIMEOUT_S = 5.0

CODE_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{3}-[0-9A-HJKMNP-TV-Z]{3}-[0-9A-HJKMNP-TV-Z]{3}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse_ts(value: str) -> datetime:
    """An RFC 3339 UTC timestamp with milliseconds, as the protocol writes them."""
    assert TIMESTAMP_RE.fullmatch(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


@dataclass
class RunningService:
    """A service running in a task of the test's event loop."""

    service: Service
    task: asyncio.Task[None]
    address: BrokerAddress
    prefix: str

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def counters(self) -> Any:
        """The dispatcher's counters (`status` counts recorded status messages)."""
        return self.service.gateway.dispatcher.counters

    @property
    def dropped(self) -> int:
        """How many request messages the gateway dropped for their topic."""
        counters = self.service.gateway.counters
        return sum(n for name, n in counters.items() if name.startswith("dropped."))

    def assert_serving(self) -> None:
        """The service task is still running (a bad message did not end it)."""
        assert not self.task.done(), self.task
        assert self.service.gateway.connected.is_set()

    async def stop(self) -> None:
        """Stop serving and release everything."""
        if not self.task.done():
            self.service.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT_S)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task
                await self.service.close()
                raise
        await asyncio.wait_for(self.service.close(), STOP_TIMEOUT_S)


StartService = Callable[..., Awaitable[RunningService]]
"""The `start_service` fixture: `await start_service(**setting_overrides)`."""


async def start_running(service: Service, address: BrokerAddress, prefix: str) -> RunningService:
    """Run `service` in a task and wait (bounded) until it is connected and subscribed."""
    task = asyncio.create_task(service.run())
    running = RunningService(service, task, address, prefix)
    connected = asyncio.ensure_future(service.gateway.connected.wait())
    done, _ = await asyncio.wait(
        {connected, task}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if connected not in done:
        connected.cancel()
        await running.stop()
        pytest.fail(f"the service did not connect within {CONNECT_TIMEOUT_S} s")
    return running


def instance_settings(topic_prefix: str, key_prefix: str, **values: Any) -> dict[str, Any]:
    """The settings every test service starts from, `values` on top: the secret, the
    prefixes, no shared group, and short grace and reconnect times (bounded stops)."""
    return {
        "pairing_secret": SECRET,
        "pairing_topic_prefix": topic_prefix,
        "pairing_key_prefix": key_prefix,
        "pairing_shared_group": "",
        "pairing_shutdown_grace_s": 2.0,
        "mqtt_reconnect_max_s": 1.0,
        **values,
    }


@contextlib.asynccontextmanager
async def instances(base: dict[str, Any]) -> AsyncIterator[StartService]:
    """`await start(**overrides)` runs one more service with `base` and `overrides` as its
    settings (and a client id of its own) until the context ends. Every instance is
    stopped then, the others too if one fails to stop."""
    started: list[RunningService] = []

    async def start(**overrides: Any) -> RunningService:
        values = {**base, "mqtt_client_id": f"svc:{uuid.uuid4().hex[:12]}", **overrides}
        service = await build_service(load_settings(**values))
        address = BrokerAddress.from_url(values["mqtt_url"])
        running = await start_running(service, address, values["pairing_topic_prefix"])
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


@dataclass
class Peers:
    """Makes runners and apps on one broker and prefix; use them as `async with`."""

    address: BrokerAddress
    prefix: str

    def runner(
        self, ident: str = "r1", protocol: Literal["5", "3.1.1"] = "5", **kwargs: Any
    ) -> RunnerClient:
        return RunnerClient(ident, self.address, prefix=self.prefix, protocol=protocol, **kwargs)

    def app(
        self, ident: str = "a1", protocol: Literal["5", "3.1.1"] = "5", **kwargs: Any
    ) -> AppClient:
        return AppClient(ident, self.address, prefix=self.prefix, protocol=protocol, **kwargs)


async def events(client: PairingClient, count: int) -> list[dict[str, Any]]:
    """The next `count` events of `client` (in arrival order)."""
    return [await client.next_event(EVENT_TIMEOUT_S) for _ in range(count)]


async def no_more_events(client: PairingClient, wait_s: float = 0.3) -> None:
    """Assert that no further event arrives within `wait_s`."""
    with contextlib.suppress(TimeoutError):
        extra = await client.next_event(wait_s)
        pytest.fail(f"unexpected event: {extra}")


def by_event(received: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped by their `event` name."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for event in received:
        grouped.setdefault(event["event"], []).append(event)
    return grouped


def check_event_envelope(event: dict[str, Any]) -> None:
    """Every event has an event_id and an `at` timestamp."""
    assert isinstance(event["event_id"], str)
    assert event["event_id"]
    parse_ts(event["at"])


@dataclass
class Seen:
    """One message a `Sniffer` received."""

    topic: str
    payload: bytes
    properties: Any
    retained: bool
    """A retained message replayed on subscribe (not one published since)."""

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def correlation(self) -> bytes | None:
        return getattr(self.properties, "CorrelationData", None) if self.properties else None

    @property
    def expiry(self) -> int | None:
        props = self.properties
        return getattr(props, "MessageExpiryInterval", None) if props else None


@dataclass
class Sniffer:
    """A raw MQTT 5 client that records every message on its filters, in arrival order.

    `next(topic)` waits for the next message on exactly that topic not yet returned by
    `next`; `seen` holds everything received.
    """

    client: aiomqtt.Client
    seen: list[Seen] = field(default_factory=list)
    _cursor: dict[str, int] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            if isinstance(payload, str):
                payload = payload.encode()
            body = bytes(payload) if isinstance(payload, bytes | bytearray) else b""
            seen = Seen(message.topic.value, body, message.properties, message.retain)
            self.seen.append(seen)
            self._changed.set()

    def on(self, topic: str) -> list[Seen]:
        """Everything received so far on `topic` (retained replays left out)."""
        return [m for m in self.seen if m.topic == topic and not m.retained]

    def under(self, prefix: str) -> list[Seen]:
        """Everything received so far on topics starting with `prefix` (no replays)."""
        return [m for m in self.seen if m.topic.startswith(prefix) and not m.retained]

    async def next(self, topic: str, timeout_s: float = REPLY_TIMEOUT_S) -> Seen:
        """The next message on `topic` not yet returned by `next`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            found = self.on(topic)
            index = self._cursor.get(topic, 0)
            if len(found) > index:
                self._cursor[topic] = index + 1
                return found[index]
            self._changed.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no message on {topic} within {timeout_s} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        await self.client.publish(topic, payload, qos=1, **kwargs)


@contextlib.asynccontextmanager
async def sniffing(address: BrokerAddress, *filters: str) -> AsyncIterator[Sniffer]:
    """A `Sniffer` subscribed (QoS 1) to `filters`, ready when entered."""
    client = aiomqtt.Client(
        address.host,
        address.port,
        identifier=f"sniffer-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[NODELAY],
        timeout=10,
    )
    async with client:
        sniffer = Sniffer(client)
        for topic_filter in filters:
            await client.subscribe(topic_filter, qos=1)
        reader = asyncio.create_task(sniffer.read())
        try:
            yield sniffer
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader
