"""One recorder of MQTT traffic: a raw MQTT 5 client that keeps every message it receives.

`Recorder` subscribes (QoS 1) to topic filters and records each message in arrival order,
copies included (nothing is deduplicated: tests count copies), with its properties, its
retained flag and when it came. Every captured message is also handed to the recorder's
checkers (`add_checker`), e.g. a schema validator for a contract test; what a checker
raises is kept in `problems` and `assert_checked()` fails the test with it (the
`recorder` fixture does that after the test).

Reading what was seen: `on(topic)`, `under(prefix)`, `next(topic)` (each message once, in
order), the pairing views `events(kind, id, name)`, `replies(kind, id, op)`,
`statuses(runner_id)`, `presence_events(app_id)`, and `wait_for(...)`, `wait_events(...)`.
`barrier(prefix)` waits until everything the service published before it has arrived.

`RecordingClient(address, *filters)` (also `recording`) is the async context that
connects, subscribes and reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.waiting import wait_until

REPLY_TIMEOUT_S = 5.0
EVENT_TIMEOUT_S = 5.0

PartyKind = Literal["runner", "app"]
Checker = Callable[[str, bytes, Any], None]
"""`checker(topic, payload, properties)`: raises (AssertionError, ...) on a bad message."""


@dataclass
class Message:
    """One message the recorder received."""

    topic: str
    payload: bytes
    properties: Any
    retained: bool
    """A retained message replayed on subscribe (not one published since)."""
    at: float = field(default_factory=time.monotonic)
    """When it arrived (time.monotonic)."""

    def json(self) -> Any:
        return json.loads(self.payload)

    @property
    def body(self) -> dict[str, Any]:
        """The payload as a JSON object, or {} when it is not one."""
        try:
            value = json.loads(self.payload)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def correlation(self) -> bytes | None:
        return getattr(self.properties, "CorrelationData", None) if self.properties else None

    @property
    def expiry(self) -> int | None:
        props = self.properties
        return getattr(props, "MessageExpiryInterval", None) if props else None


class Recorder:
    """Records every message on its filters; see the module docstring.

    Args:
        client: a connected aiomqtt client (made by `recording`).
        prefix: the topic prefix of the pairing views (`events`, `replies`, ...).
    """

    def __init__(self, client: aiomqtt.Client, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix
        self.seen: list[Message] = []
        self.problems: list[str] = []
        self._checkers: list[Checker] = []
        self._cursor: dict[str, int] = {}
        self._changed = asyncio.Event()

    # ---- recording ---------------------------------------------------------------------
    def add_checker(self, checker: Checker) -> None:
        """Hand every message received from now on to `checker` as well."""
        self._checkers.append(checker)

    def assert_checked(self) -> None:
        """Fail if a checker refused a message."""
        assert not self.problems, "\n".join(self.problems)

    async def read(self) -> None:
        async for message in self.client.messages:
            raw = message.payload
            payload = raw.encode() if isinstance(raw, str) else bytes(raw or b"")  # type: ignore[arg-type]
            seen = Message(message.topic.value, payload, message.properties, message.retain)
            self.seen.append(seen)
            for checker in self._checkers:
                try:
                    checker(seen.topic, payload, message.properties)
                except Exception as exc:
                    self.problems.append(f"{seen.topic}: {type(exc).__name__}: {exc}")
            self._changed.set()

    async def subscribe(self, filters: Iterable[str], *, no_local: bool = False) -> None:
        """Subscribe (QoS 1) to more filters; `no_local`: not what this client publishes."""
        for topic_filter in filters:
            if no_local:
                options = SubscribeOptions(qos=1, noLocal=True)
                await self.client.subscribe(topic_filter, options=options)
            else:
                await self.client.subscribe(topic_filter, qos=1)

    async def publish(self, topic: str, payload: bytes | str, **kwargs: Any) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        await self.client.publish(topic, payload, qos=1, **kwargs)

    # ---- raw views ---------------------------------------------------------------------
    @property
    def received(self) -> list[tuple[str, bytes]]:
        """(topic, payload) of everything received, retained replays included."""
        return [(m.topic, m.payload) for m in self.seen]

    def topics(self) -> list[str]:
        return [m.topic for m in self.seen]

    def on(self, topic: str) -> list[Message]:
        """Everything received so far on `topic` (retained replays left out)."""
        return [m for m in self.seen if m.topic == topic and not m.retained]

    def under(self, prefix: str) -> list[Message]:
        """Everything received so far on topics starting with `prefix` (no replays)."""
        return [m for m in self.seen if m.topic.startswith(prefix) and not m.retained]

    async def next(self, topic: str, timeout_s: float = REPLY_TIMEOUT_S) -> Message:
        """The next message on `topic` not yet returned by `next`.

        Raises:
            TimeoutError: none within `timeout_s`.
        """
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

    async def wait_for(
        self, condition: Callable[[], Any], what: str, timeout_s: float = EVENT_TIMEOUT_S
    ) -> Any:
        """Wait (bounded) until `condition()` over what was seen is truthy; return it."""
        return await wait_until(condition, timeout_s, what)

    # ---- pairing views -----------------------------------------------------------------
    def events_topic(self, kind: PartyKind, ident: str) -> str:
        return f"{self.prefix}/{kind}s/{ident}/events"

    def events(self, kind: PartyKind, ident: str, name: str | None = None) -> list[dict[str, Any]]:
        """Events received on one party's events topic (optionally of one kind)."""
        topic = self.events_topic(kind, ident)
        return [
            m.body
            for m in self.seen
            if m.topic == topic and (name is None or m.body.get("event") == name)
        ]

    def all_events(self) -> list[dict[str, Any]]:
        return [m.body for m in self.seen if m.topic.endswith("/events")]

    def presence_events(self, app_id: str, *, copies: bool = False) -> list[dict[str, Any]]:
        """`runner.online` / `runner.offline` events an app received, in order.

        A copy (same `event_id`, docs/design.md "Delivery": never lost, maybe repeated)
        is dropped after checking it equals the first, unless `copies`.
        """
        got = [e for e in self.events("app", app_id) if e.get("event", "").startswith("runner.")]
        if copies:
            return got
        first: dict[str, dict[str, Any]] = {}
        for event in got:
            seen = first.setdefault(event["event_id"], event)
            assert seen == event, f"two events with one event_id differ: {seen} / {event}"
        return list(first.values())

    def statuses(self, runner_id: str) -> list[Message]:
        """Status messages (the Last Will included) seen on a runner's status topic."""
        return [m for m in self.seen if m.topic == f"{self.prefix}/runners/{runner_id}/status"]

    def replies(self, kind: PartyKind, ident: str, op: str) -> list[dict[str, Any]]:
        topic = f"{self.prefix}/{kind}s/{ident}/res/{op}"
        return [m.body for m in self.seen if m.topic == topic]

    async def wait_events(
        self,
        kind: PartyKind,
        ident: str,
        name: str,
        count: int = 1,
        timeout_s: float = EVENT_TIMEOUT_S,
    ) -> list[dict[str, Any]]:
        """Wait until `count` distinct events `name` (by event_id) have arrived for one
        party; return everything received of that name (copies included)."""

        def distinct() -> bool:
            return len({e.get("event_id") for e in self.events(kind, ident, name)}) >= count

        await wait_until(distinct, timeout_s, f"{count} {name} event(s) for {kind} {ident}")
        return self.events(kind, ident, name)

    async def barrier(
        self, timeout_s: float = REPLY_TIMEOUT_S, *, prefix: str | None = None
    ) -> str:
        """Wait until everything the service published before now has reached us.

        Publishes a `sessions` request of a runner of its own and waits for the reply:
        MQTT keeps one connection's messages in order, and the service publishes replies
        and events on one connection. The recorder must see `P/runners/+/res/+`. With
        several instances, only the one that answers is covered.

        Args:
            timeout_s: the bound on the reply.
            prefix: the service's topic prefix (default: the recorder's).

        Returns:
            The runner id the barrier used (its topics contain `/barrier-`).
        """
        base = self.prefix if prefix is None else prefix
        ident = f"barrier-{uuid.uuid4().hex[:8]}"
        request_id = uuid.uuid4().hex
        await self.publish(
            f"{base}/runners/{ident}/req/sessions", json.dumps({"request_id": request_id})
        )
        reply_topic = f"{base}/runners/{ident}/res/sessions"
        await wait_until(
            lambda: any(m.body.get("request_id") == request_id for m in self.on(reply_topic)),
            timeout_s,
            "the reply to the barrier request",
        )
        return ident


def pairing_filters(prefix: str) -> list[str]:
    """Every event, reply and runner status under `prefix`."""
    return [f"{prefix}/+/+/events", f"{prefix}/+/+/res/+", f"{prefix}/runners/+/status"]


class RecordingClient(Recorder):
    """A `Recorder` with its own connection: `async with RecordingClient(...) as r`.

    Args:
        address: the broker, as a client of it connects (credentials, transport, TLS).
        filters: topic filters, subscribed at QoS 1 on entering.
        prefix: the topic prefix of the pairing views.
        no_local: MQTT 5 No Local: never record what the recorder itself publishes.
        label: part of the default client id.
        v311: speak MQTT 3.1.1 instead of 5.
        persistent: keep the broker session when disconnected (MQTT 5: clean start off and
            a 300 s Session Expiry; 3.1.1: clean session off), so that the broker goes on
            queueing for it while it is away.
        client_id: the client id it asks for (default: `<label>-<random>`).
    """

    def __init__(
        self,
        address: BrokerAddress,
        *filters: str,
        prefix: str = "",
        no_local: bool = False,
        label: str = "recorder",
        v311: bool = False,
        persistent: bool = False,
        client_id: str | None = None,
    ) -> None:
        session: dict[str, Any] = {}
        if v311:
            session["clean_session"] = not persistent
        elif persistent:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 300
            session.update(clean_start=False, properties=properties)
        client = aiomqtt.Client(
            **address.client_options(),
            identifier=client_id or f"{label}-{uuid.uuid4().hex[:12]}",
            protocol=aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5,
            timeout=10,
            **session,
        )
        super().__init__(client, prefix)
        self.label = label
        self._filters = filters
        self._no_local = no_local
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        try:
            await self.subscribe(self._filters, no_local=self._no_local)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.__aexit__(None, None, None)
            raise
        self._reader = asyncio.create_task(self.read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)


recording = RecordingClient
"""`async with recording(address, *filters, ...) as recorder`: a `RecordingClient`."""
