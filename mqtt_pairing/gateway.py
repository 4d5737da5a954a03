"""PairingGateway: the MQTT side of the service (aiomqtt). Only this module knows MQTT.

Delivery (docs/design.md "Delivery" and "Verified facts"): the connection uses clean start
off, a stable client id and (MQTT 5) a Session Expiry Interval, so requests published
while the service is away are kept by the broker; incoming QoS 1 messages are
acknowledged manually after their reply is published; TCP_NODELAY is set on the socket;
aiomqtt does not reconnect by itself, so `run` reconnects with capped exponential backoff
and jitter around one reused `Client`. In-flight requests are bounded
(`PAIRING_MAX_INFLIGHT`); bad messages are counted and dropped without stopping the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
import zlib
from collections import Counter
from typing import Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.config import LEGACY_SHARED_GROUP, Settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.errors import PairingError
from mqtt_pairing.faults import fault_point

# NODELAY and BrokerAddress live in mqtt_address; importing them from here still works
# while branches written before the move are merged (then drop NODELAY from this line).
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress, describe_connect_error  # noqa: F401
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import OutboxRelay
from mqtt_pairing.topics import Identity, Kind, RequestTopic, TopicDrop, TopicScheme

log = logging.getLogger(__name__)

_BACKOFF_FIRST_S = 0.2
_STATUS_QUEUE_MAX = 10_000
_STATUS_WORKERS = 4
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
"""What `json.dumps(obj, separators=(",", ":"))` does, without a new encoder per call."""


def _reply_properties(correlation: bytes | None, expiry_s: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = expiry_s
    if correlation is not None:
        props.CorrelationData = correlation
    return props


class PairingGateway:
    """Subscribes to requests, hands them to the dispatcher, publishes replies and events.

    Args:
        settings: all settings (client id, keepalive, session expiry, share group, ...).
        dispatcher: turns requests into replies and events.
        address: the broker to connect to.
        protocol: "5" or "3.1.1" (the embedded amqtt broker speaks 3.1.1 only).
        share_group: shared-subscription group; "" subscribes without `$share`.

    Attributes:
        counters: dropped topics and publish failures, by name.
        connected: set while a broker connection is up (readiness).
    """

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        address: BrokerAddress,
        *,
        protocol: Literal["5", "3.1.1"] = "5",
        share_group: str = "",
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.address = address
        self.protocol = protocol
        self.share_group = share_group
        self.scheme = TopicScheme(settings.pairing_topic_prefix)
        self.counters: Counter[str] = Counter()
        self.connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight = asyncio.Semaphore(settings.pairing_max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        # Status messages have their own bounded queues and workers, so that a flood of
        # them never delays requests; what does not fit is shed and counted. One runner's
        # messages always go to the same worker, so they are recorded in order.
        self._status_queues: list[asyncio.Queue[aiomqtt.Message]] = [
            asyncio.Queue(_STATUS_QUEUE_MAX // _STATUS_WORKERS) for _ in range(_STATUS_WORKERS)
        ]
        # With a shared group (several instances), one instance at a time records status
        # messages: the holder of a lease in Redis. Status messages carry no sequence
        # number, so two instances recording the same stream could apply them out of
        # order. A new holder subscribes, and the broker replays the retained statuses.
        self.instance_id = f"{settings.mqtt_client_id}/{uuid.uuid4().hex[:8]}"
        self.records_presence = not share_group
        self.client = self._make_client()
        # Built once: paho packs them on every publish and never changes them.
        self._event_props = (
            _reply_properties(None, settings.pairing_reply_expiry_s) if self.v5 else None
        )
        self.relay = OutboxRelay(
            dispatcher.store, settings, self.publish_events, dispatcher.history
        )

    @property
    def v5(self) -> bool:
        """True when the connection speaks MQTT 5."""
        return self.protocol == "5"

    def _make_client(self) -> aiomqtt.Client:
        s = self.settings
        a = self.address
        kwargs: dict[str, Any] = {}
        if self.v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = s.mqtt_session_expiry_s
            # Flow control: the broker holds back what this instance cannot take yet
            # (unacknowledged QoS 1 messages beyond this), instead of the client queue.
            props.ReceiveMaximum = min(s.pairing_max_inflight, 65_535)
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props)
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=False)
        client = aiomqtt.Client(
            **a.client_options(),  # host, credentials, transport, verified TLS, NODELAY
            identifier=s.mqtt_client_id,
            keepalive=s.mqtt_keepalive_s,
            # Unbounded here: what arrives is bounded by the broker's in-flight window
            # (Receive Maximum above; max_inflight_messages for MQTT 3.1.1), since every
            # request is acknowledged only after its reply. A bounded aiomqtt queue would
            # drop messages silently, unanswered and never acknowledged.
            max_queued_incoming_messages=None,
            timeout=10,
            **kwargs,
        )
        # Acknowledge a request only after its reply is out (paho 2 manual ack).
        client._client.manual_ack_set(True)  # not exposed by aiomqtt 2.5
        # Every request in flight may wait for its reply and a few events at once:
        # aiomqtt's default (10) would log a warning on most publishes under load.
        client.pending_calls_threshold = max(10, 8 * s.pairing_max_inflight)
        return client

    def stop(self) -> None:
        """Ask `run` to stop: no new requests; in-flight ones finish within the grace."""
        self._stopping.set()

    async def run(self) -> None:
        """Connect, subscribe and serve until `stop`; reconnect on a lost connection.

        Never returns because of a broker error; returns after `stop`, when in-flight
        requests are done (bounded by `PAIRING_SHUTDOWN_GRACE_S`).
        """
        background = [
            asyncio.create_task(self.relay.run(self.connected, self._stopping)),
            *(asyncio.create_task(self._status_worker(q)) for q in self._status_queues),
        ]
        if self.share_group:
            background.append(asyncio.create_task(self._presence_leadership()))
        try:
            await self._connection_loop()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _connection_loop(self) -> None:
        backoff = _BACKOFF_FIRST_S
        while not self._stopping.is_set():
            try:
                async with self.client:
                    await self._subscribe()
                    self.connected.set()
                    backoff = _BACKOFF_FIRST_S
                    log.info(
                        "connected to the broker at %s:%d (MQTT %s, client id %s)",
                        self.address.host,
                        self.address.port,
                        self.protocol,
                        self.settings.mqtt_client_id,
                    )
                    await self._serve()
                    await self._leave_group()
                    await self._drain()
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                if self._stopping.is_set():
                    break
                delay = min(backoff, self.settings.mqtt_reconnect_max_s)
                delay *= random.uniform(0.5, 1.0)
                log.warning(
                    "broker connection lost (%s); retrying in %.1f s",
                    describe_connect_error(exc, self.address),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                backoff = min(backoff * 2, self.settings.mqtt_reconnect_max_s)
        self.connected.clear()
        await self._drain()

    async def _subscribe(self) -> None:
        for kind in Kind:
            topic = self.scheme.request_filter(kind, self.share_group)
            await self.client.subscribe(topic, qos=1)
            if self.share_group != LEGACY_SHARED_GROUP:
                # A session resumed from a version with the public default group still
                # holds it, and a runner or app could share it (docs/security.md).
                legacy = self.scheme.request_filter(kind, LEGACY_SHARED_GROUP)
                await self.client.unsubscribe(legacy)
        # Without $share: shared subscriptions get no retained messages (docs/design.md). An
        # instance that does not record presence drops a subscription its persistent
        # session may keep from an earlier run.
        await self._toggle_status_subscription(self.records_presence)

    async def _leave_group(self) -> None:
        """On stop, leave the shared group before draining.

        The instance's broker session outlives it (clean start off), so the broker would
        otherwise go on giving it a share of new requests.
        """
        if not self.share_group:
            return
        for kind in Kind:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.unsubscribe(self.scheme.request_filter(kind, self.share_group))

    async def _presence_leadership(self) -> None:
        """Hold (or wait for) the presence lease; (un)subscribe status topics to match."""
        lease_s = self.settings.pairing_presence_lease_s
        try:
            while not self._stopping.is_set():
                try:
                    held = await self.dispatcher.store.hold_presence_lease(
                        self.instance_id, lease_s=lease_s
                    )
                except PairingError:
                    held = False  # Redis away: the lease lapses for everyone alike
                if held != self.records_presence:
                    self.records_presence = held
                    log.info("%s recording runners' status", "now" if held else "no longer")
                    if self.connected.is_set():
                        await self._toggle_status_subscription(held)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), lease_s / 3)
        finally:
            with contextlib.suppress(Exception):
                await self.dispatcher.store.hold_presence_lease(
                    self.instance_id, lease_s=lease_s, release=True
                )

    async def _toggle_status_subscription(self, on: bool) -> None:
        try:
            if on:
                await self.client.subscribe(self.scheme.status_filter(), qos=1)
            else:
                await self.client.unsubscribe(self.scheme.status_filter())
        except aiomqtt.MqttError as exc:
            log.warning("status subscription not changed: %s", exc)

    async def _serve(self) -> None:
        """Take messages until `stop` (returns) or a lost connection (raises MqttError)."""
        # One reader task for the whole connection, cancelled on stop: cheaper than
        # waiting for "next message or stop" anew for every message.
        reader = asyncio.ensure_future(self._read())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await reader
        if not reader.cancelled():
            with contextlib.suppress(StopAsyncIteration):
                reader.result()  # a lost connection: MqttError

    async def _read(self) -> None:
        messages = self.client.messages
        while True:
            # The in-flight slot first, then the message: a stop (which cancels this
            # task) never comes between taking a message and handing it to its task.
            await self._inflight.acquire()
            try:
                message = await anext(messages)
            except BaseException:
                self._inflight.release()
                raise
            runner_id = self.scheme.parse_status(message.topic.value)
            if runner_id is not None:
                self._inflight.release()  # status messages have their own queues
                queue = self._status_queues[zlib.crc32(runner_id.encode()) % _STATUS_WORKERS]
                if not self.records_presence:
                    self._ack(message)  # another instance holds the presence lease
                    continue
                try:
                    queue.put_nowait(message)
                except asyncio.QueueFull:
                    self.counters["status_shed"] += 1
                    self._ack(message)
                continue
            task = asyncio.create_task(self._process(message))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    @property
    def in_flight(self) -> int:
        """Request and status messages being processed now."""
        return len(self._tasks)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight.release()

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(
            set(self._tasks), timeout=self.settings.pairing_shutdown_grace_s
        )
        for task in pending:
            task.cancel()

    async def _status_worker(self, queue: asyncio.Queue[aiomqtt.Message]) -> None:
        while True:
            message = await queue.get()
            await self._process(message)

    def _ack(self, message: aiomqtt.Message) -> None:
        if message.qos > 0:
            with contextlib.suppress(Exception):
                self.client._client.ack(message.mid, message.qos)

    async def _process(self, message: aiomqtt.Message) -> None:
        try:
            await self._process_inner(message)
        except aiomqtt.MqttError as exc:
            self.counters["publish_failed"] += 1
            log.warning("could not publish a reply: %s", exc)
        except Exception:
            # Last line of defence: one bad message never stops the service, and it is
            # acknowledged so that it does not come back after every reconnect.
            self.counters["internal_error"] += 1
            log.exception("unexpected error processing a message")
            self._ack(message)
        else:
            self._ack(message)

    async def _process_inner(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        topic = message.topic.value
        runner_id = self.scheme.parse_status(topic)
        if runner_id is not None:
            handled = await self.dispatcher.handle_status(
                runner_id, bytes(payload), retained=bool(message.retain)
            )
        else:
            parsed = self.scheme.parse_request(topic)
            if isinstance(parsed, TopicDrop):
                self.counters[f"dropped.{parsed.reason}"] += 1
                return
            handled = await self.dispatcher.handle(
                parsed.identity, parsed.op, bytes(payload), defer=True
            )
            if handled.reply is not None:
                try:
                    await self._reply(message, parsed, handled.reply)
                except Exception:
                    # Not acknowledged, so the request comes back; finish this attempt
                    # so that the copy finds its reply rather than a pending mark.
                    if handled.after:
                        with contextlib.suppress(PairingError):
                            await self.dispatcher.store.batch(handled.after)
                    raise
        if handled.outbox or handled.after:
            fault_point("before_publish_events")
            try:
                await self.relay.deliver(
                    handled.outbox,
                    marked=handled.outbox_marked,
                    after=handled.after,
                    recorded=handled.recorded,
                )
            except PairingError as exc:
                # The entries stay in the outbox; the sweep publishes them.
                log.warning("events left for the outbox sweep: %s", exc.message)
        await self.dispatcher.history.record(handled.history)

    async def _reply(
        self, message: aiomqtt.Message, req: RequestTopic, reply: dict[str, Any]
    ) -> None:
        topic = self.scheme.reply_topic(req.identity, req.op)
        props = None
        if self.v5:
            incoming = message.properties
            response_topic = getattr(incoming, "ResponseTopic", None) if incoming else None
            correlation = getattr(incoming, "CorrelationData", None) if incoming else None
            if self.scheme.accept_response_topic(req.identity, response_topic):
                assert response_topic is not None  # noqa: S101
                topic = response_topic
            elif response_topic is not None:
                self.counters["response_topic_refused"] += 1
            if req.op == "code" and reply.get("ok"):
                props = _reply_properties(correlation, int(reply["result"]["ttl_s"]))
            elif correlation is None:
                props = self._event_props  # the same expiry, nothing else
            else:
                props = _reply_properties(correlation, self.settings.pairing_reply_expiry_s)
        body = _COMPACT_JSON.encode(reply).encode()
        await self.client.publish(topic, body, qos=1, properties=props)

    async def publish_events(self, events: list[Event]) -> None:
        """Publish events at QoS 1 on the parties' events topics.

        Raises:
            aiomqtt.MqttError: the broker connection failed.
        """
        bodies: dict[int, bytes] = {}  # one payload often goes to both parties
        for event in events:
            topic = self.scheme.events_topic(Identity(event.kind, event.id))
            body = bodies.get(id(event.payload))
            if body is None:
                body = _COMPACT_JSON.encode(event.payload).encode()
                bodies[id(event.payload)] = body
            await self.client.publish(topic, body, qos=1, properties=self._event_props)
