"""PairingGateway: requests in, replies and events out, over MQTT (aiomqtt).

Only this module and the connection modules next to it (`mqtt_link`, `presence`) know
MQTT.

Delivery (docs/design.md "Delivery" and "Verified facts"): the requests connection uses
clean start off, a stable client id and (MQTT 5) a Session Expiry Interval, so requests
published while the service is away are kept by the broker; incoming QoS 1 messages are
acknowledged manually after their reply is published; TCP_NODELAY is set on the socket.
`mqtt_link.MqttLink` reconnects with backoff and names a twin client. In-flight requests
are bounded (`PAIRING_MAX_INFLIGHT`), and so are one client's
(`PAIRING_MAX_INFLIGHT_PER_CLIENT`: its excess is answered RATE_LIMITED at once, without
Redis, so that a flood from one client does not starve the others), and so is its rate
(`PAIRING_MAX_REQUESTS_PER_CLIENT_S`, a token bucket of twice that: the excess is shed
the same way). Past `PAIRING_MAX_INFLIGHT_PER_CLIENT` RATE_LIMITED replies a second, a
client's further excess is acknowledged and dropped without a reply, counted as
`dropped.flood` (docs/security.md "Request floods"), so that the service drains a
flood as fast as it reads; bad messages are
counted and dropped without stopping the loop. A request delivered with the retain flag
is a stale retained message the broker replays (Mosquitto 2.0.11 replays them to shared
subscriptions too): it is ignored and counted, never answered (docs/protocol.md
"Topics"); on MQTT 5 the request subscriptions ask for no replay at all (Retain Handling
2). Runners' status messages have a connection of their own (`mqtt_pairing.presence`).

Bounds (docs/protocol.md "MQTT 5 properties"): a request whose Response Topic is longer
than `MAX_RESPONSE_TOPIC_BYTES` or whose Correlation Data is longer than
`MAX_CORRELATION_DATA_BYTES` is not executed: it gets INVALID_REQUEST on the default
reply topic. Nothing is published above the broker's Maximum Packet Size (its CONNACK
says it): a reply that would be is replaced by a short INTERNAL_ERROR, or dropped and
counted. A request that was being answered when the connection dropped three times is a
poison message: its next copy is acknowledged without being handled
(`POISON_STRIKES`), so it cannot keep the service disconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import uuid
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_pairing.config import LEGACY_SHARED_GROUP, Settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.errors import PairingError, PairingErrorCode
from mqtt_pairing.faults import fault_point
from mqtt_pairing.models import error_reply
from mqtt_pairing.mqtt_link import Endpoint, MqttLink, make_client
from mqtt_pairing.payload import InvalidPayload, extract_request_id, parse_payload
from mqtt_pairing.presence import PresenceRecorder
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import OutboxRelay
from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.topics import Identity, Kind, RequestTopic, TopicDrop, TopicScheme

if TYPE_CHECKING:
    from mqtt_pairing.mqtt_address import BrokerAddress

log = logging.getLogger(__name__)

__all__ = ["PairingGateway"]

_WINDOW_LOG_EVERY_S = 60.0
"""At most one "request window full" warning per this many seconds."""
_FLOOD_LOG_EVERY_S = 60.0
"""At most one "client floods requests" warning per client per this many seconds."""
_MAX_FLOOD_STATE = 4096
"""Clients tracked for flooding before refilled buckets and old log marks are pruned."""
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))
"""What `json.dumps(obj, separators=(",", ":"))` does, without a new encoder per call."""

MAX_RESPONSE_TOPIC_BYTES = 512
"""Longest MQTT 5 Response Topic a request may carry, in UTF-8 bytes (docs/protocol.md)."""
MAX_CORRELATION_DATA_BYTES = 256
"""Longest MQTT 5 Correlation Data a request may carry, in bytes (docs/protocol.md)."""
MQTT_MAX_PACKET_BYTES = 268_435_460
"""The largest packet MQTT can encode (a 4-byte Remaining Length of 268,435,455 plus the
fixed header): the limit when the broker announces none."""
SLOW_DOWN_S = 5
"""`retry_after_s` of a request shed for its client's share of the window: RFC 8628's
"slow_down" step (add 5 s to the polling interval)."""
POISON_STRIKES = 3
"""A request whose reply was on its way at this many connection losses is dropped."""
_MAX_STRUCK = 4096
"""Requests remembered as having been on their way at a connection loss, at most."""


class TokenBuckets:
    """One token bucket per client, in memory (loop time), bounded in number.

    The buckets are kept in least-recently-used order: past `_MAX_FLOOD_STATE` clients the
    least recently seen is forgotten (a forgotten client starts again with a full bucket,
    which it would have had after `capacity / rate` s idle anyway). O(1) per take however
    many clients there are (a runner fleet heartbeating is tens of thousands).

    Args:
        rate: tokens added per second.
        capacity: tokens held at most (a full bucket after `capacity / rate` s idle).
    """

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> bool:
        """Take a token from `client`'s bucket: False when it is empty."""
        now = asyncio.get_running_loop().time()
        buckets = self._buckets
        tokens, since = buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - since) * self.rate)
        taken = tokens >= 1.0
        if taken:
            tokens -= 1.0
        buckets[client] = (tokens, now)
        if len(buckets) > _MAX_FLOOD_STATE:
            buckets.popitem(last=False)
        return taken


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def publish_packet_bytes(topic: str, body: bytes, props: Properties | None, *, v5: bool) -> int:
    """Size in bytes of the QoS 1 PUBLISH packet that carries `body` on `topic`.

    Fixed header, topic, packet identifier, properties (MQTT 5) and payload: what a
    broker compares with its `max_packet_size`.
    """
    remaining = 2 + len(topic.encode()) + 2 + len(body)
    if v5:
        remaining += len(props.pack()) if props is not None else 1  # type: ignore[no-untyped-call]
    return 1 + _varint_len(remaining) + remaining


def _fingerprint(message: aiomqtt.Message) -> bytes:
    """What identifies a copy of a request across redeliveries: topic, payload, properties."""
    digest = hashlib.blake2b(digest_size=16)
    payload = message.payload
    digest.update(message.topic.value.encode())
    digest.update(b"\x00")
    digest.update(payload if isinstance(payload, bytes | bytearray) else str(payload).encode())
    props = message.properties
    if props is not None:
        for name in ("ResponseTopic", "CorrelationData"):
            value = getattr(props, name, None)
            digest.update(b"\x00")
            if isinstance(value, str):
                digest.update(value.encode(errors="surrogatepass"))
            elif isinstance(value, bytes | bytearray):
                digest.update(value)
    return digest.digest()


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
        counters: dropped topics, retained requests, publish failures, the requests
            connection's losses and takeovers, by name (the presence recorder has its own).
        connected: set while the requests connection is up (readiness).
        presence: records runners' status messages on the presence connection.
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
        self._stopping = asyncio.Event()
        self._inflight = asyncio.Semaphore(settings.pairing_max_inflight)
        self._per_client: dict[str, int] = {}
        """Requests being handled (not shed) per client, `<kind>s/<id>`."""
        self._per_client_limit = settings.pairing_max_inflight_per_client
        self._window_logged_at: float | None = None
        rate = settings.pairing_max_requests_per_client_s
        self._admitted = TokenBuckets(rate, 2 * rate)
        """Requests handled per client and second (the rest is shed)."""
        self._shed_replies = TokenBuckets(self._per_client_limit, self._per_client_limit)
        """RATE_LIMITED replies per client and second (the rest is dropped)."""
        self._flood_logged_at: dict[str, float] = {}
        """Per client: when its flood was last logged (loop time)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.instance_id = f"{settings.mqtt_client_id}/{uuid.uuid4().hex[:8]}"
        self.client = make_client(
            address,
            settings,
            client_id=settings.mqtt_client_id,
            protocol=protocol,
            persistent=True,
            # Flow control: the broker holds back what this instance cannot take yet
            # (unacknowledged QoS 1 messages beyond this), instead of the client queue.
            receive_maximum=min(settings.pairing_max_inflight, 65_535),
        )
        # Acknowledge a request only after its reply is out (paho 2 manual ack).
        self.client._client.manual_ack_set(True)  # not exposed by aiomqtt 2.5
        self.max_packet_bytes = MQTT_MAX_PACKET_BYTES
        """The broker's Maximum Packet Size (MQTT 5 CONNACK), else the protocol's."""
        self._watch_connack()
        self._sending: dict[object, tuple[bytes, str, bytes]] = {}
        """Replies being published: a token per attempt -> (request fingerprint, topic,
        body)."""
        self._strikes: dict[bytes, int] = {}
        """Request fingerprint -> connection losses while its reply was on its way."""
        # Every request in flight may wait for its reply and a few events at once:
        # aiomqtt's default (10) would log a warning on most publishes under load.
        self.client.pending_calls_threshold = max(10, 8 * settings.pairing_max_inflight)
        self.link = MqttLink(
            self.client,
            Endpoint(address, protocol, settings.mqtt_client_id, "requests"),
            reconnect_max_s=settings.mqtt_reconnect_max_s,
            counters=self.counters,
        )
        self.connected = self.link.connected
        # Built once: paho packs them on every publish and never changes them. Replies
        # without Correlation Data carry only the expiry; events carry no properties at all
        # (docs/protocol.md "MQTT 5 properties": a runner that comes back to its persistent
        # session days later still receives `session.opened`).
        self._plain_reply_props = (
            _reply_properties(None, settings.pairing_reply_expiry_s) if self.v5 else None
        )
        self.relay = OutboxRelay(
            dispatcher.store, settings, self.publish_events, dispatcher.history
        )
        self.presence = PresenceRecorder(
            settings,
            dispatcher,
            address,
            protocol=protocol,
            finish=self._finish,
            drops=self.counters,
            shared=bool(share_group),
            instance_id=self.instance_id,
        )
        # A pair refused RUNNER_OFFLINE on a stale record waits for it to be refreshed.
        dispatcher.sessions.presence = self.presence

    def _watch_connack(self) -> None:
        """Read the broker's Maximum Packet Size from each CONNACK (aiomqtt drops it)."""
        paho = self.client._client
        aiomqtt_on_connect = paho.on_connect

        def on_connect(*args: Any) -> None:  # noqa: ANN401 - paho's callback arguments
            props = args[4] if len(args) > 4 else None
            size = getattr(props, "MaximumPacketSize", None) if props is not None else None
            self.max_packet_bytes = size if isinstance(size, int) else MQTT_MAX_PACKET_BYTES
            if aiomqtt_on_connect is not None:
                aiomqtt_on_connect(*args)

        paho.on_connect = on_connect

    @property
    def v5(self) -> bool:
        """True when the connection speaks MQTT 5."""
        return self.protocol == "5"

    @property
    def records_presence(self) -> bool:
        """Whether this instance records runners' status now (the lease holder, if shared)."""
        return self.presence.records

    @property
    def conflict(self) -> str | None:
        """Why `/readyz` fails while another client uses one of our client ids, else None."""
        return self.link.conflict or self.presence.link.conflict

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
            asyncio.create_task(self.presence.run(self._stopping)),
        ]
        try:
            await self.link.run(self._subscribe, self._session, self._stopping)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        await self._drain()

    async def _session(self, _client: aiomqtt.Client) -> None:
        try:
            await self._serve()
        except aiomqtt.MqttError:
            self._strike_replies_on_their_way()
            raise
        await self._leave_group()
        await self._drain()

    def _strike_replies_on_their_way(self) -> None:
        """The connection dropped: count it against every request being answered now.

        Their replies are also taken out of paho's queue, which would resend them at the
        next connect (and, if one of them made the broker close the connection, close it
        again): the requests are not acknowledged, so the broker redelivers them and they
        are answered again. A request struck `POISON_STRIKES` times is a poison message
        (`_read` drops its next copy).
        """
        if not self._sending:
            return
        paho = self.client._client  # paho's queue is not exposed by aiomqtt
        doomed = {(topic, body) for _, topic, body in self._sending.values()}
        with paho._out_message_mutex:
            for mid, out in list(paho._out_messages.items()):
                if (out.topic, bytes(out.payload)) in doomed:
                    del paho._out_messages[mid]
        for fingerprint, _, _ in self._sending.values():
            self._strikes[fingerprint] = self._strikes.pop(fingerprint, 0) + 1
        while len(self._strikes) > _MAX_STRUCK:
            del self._strikes[next(iter(self._strikes))]
        self._sending.clear()

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        for kind in Kind:
            topic = self.scheme.request_filter(kind, self.share_group)
            if self.v5:
                # Retain Handling 2: no retained request replayed at subscribe.
                await client.subscribe(topic, options=SubscribeOptions(qos=1, retainHandling=2))
            else:
                await client.subscribe(topic, qos=1)
            if self.share_group != LEGACY_SHARED_GROUP:
                # A session resumed from a version with the public default group still
                # holds it, and a runner or app could share it (docs/security.md).
                await client.unsubscribe(self.scheme.request_filter(kind, LEGACY_SHARED_GROUP))
        # Status messages have their own connection now; a persistent session of an
        # earlier version may still carry the subscription.
        with contextlib.suppress(aiomqtt.MqttError):
            await client.unsubscribe(self.scheme.status_filter())

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
            if self._inflight.locked():
                self._window_full()
            await self._inflight.acquire()
            try:
                message = await anext(messages)
            except BaseException:
                self._inflight.release()
                raise
            if message.retain:
                # A stale retained request replayed by the broker: never executed again.
                self.counters["dropped.retained"] += 1
                self._inflight.release()
                self._ack(message)
                continue
            if self._strikes and self._is_poison(message):
                self._inflight.release()
                self._ack(message)
                continue
            client = self._client_of(message)
            if client is not None and (
                self._per_client.get(client, 0) >= self._per_client_limit
                or not self._admitted.take(client)
            ):
                if not self._shed_replies.take(client):
                    self._flooding(client)
                    # Far over its limit: dropped without a reply, at the cost of an
                    # acknowledgement, so that the service drains the flood at full
                    # speed (docs/security.md "Request floods").
                    self._inflight.release()
                    self._ack(message)
                    continue
                # One client's flood must not take the window from the others: its
                # excess is answered at once, without Redis (docs/protocol.md "Default
                # limits", `PAIRING_MAX_INFLIGHT_PER_CLIENT`).
                task = asyncio.create_task(self._process(message, shed=True))
            else:
                task = asyncio.create_task(self._process(message))
                if client is not None:
                    self._per_client[client] = self._per_client.get(client, 0) + 1
                    task.add_done_callback(functools.partial(self._client_done, client))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _flooding(self, client: str) -> None:
        """Count a request dropped for its client's flood; name the client now and then."""
        self.counters["dropped.flood"] += 1
        now = asyncio.get_running_loop().time()
        logged = self._flood_logged_at.get(client)
        if logged is not None and now - logged < _FLOOD_LOG_EVERY_S:
            return
        if len(self._flood_logged_at) >= _MAX_FLOOD_STATE:
            self._flood_logged_at = {
                c: at for c, at in self._flood_logged_at.items() if now - at < _FLOOD_LOG_EVERY_S
            }
        self._flood_logged_at[client] = now
        log.warning(
            "client %s floods requests (over PAIRING_MAX_REQUESTS_PER_CLIENT_S or "
            "PAIRING_MAX_INFLIGHT_PER_CLIENT): its excess is dropped without a reply; "
            "`mqtt-pairing credentials remove` stops it",
            client,
        )

    def _is_poison(self, message: aiomqtt.Message) -> bool:
        """Whether this copy of a request is one whose answer kept losing the connection."""
        fingerprint = _fingerprint(message)
        if self._strikes.get(fingerprint, 0) < POISON_STRIKES:
            return False
        del self._strikes[fingerprint]
        self.counters["dropped.poison"] += 1
        log.error(
            "dropped a request on %s without answering it: the connection was lost %d times "
            "while it was being answered (a poison message)",
            message.topic.value,
            POISON_STRIKES,
        )
        return True

    def _window_full(self) -> None:
        """Every in-flight slot is taken: further requests wait in the broker's queue."""
        self.counters["request_window_full"] += 1
        now = asyncio.get_running_loop().time()
        if self._window_logged_at is None or now - self._window_logged_at >= _WINDOW_LOG_EVERY_S:
            self._window_logged_at = now
            log.warning(
                "request window full (%d requests in flight, PAIRING_MAX_INFLIGHT): the broker "
                "queues further requests for client id %s and drops them past its "
                "max_queued_messages",
                self.settings.pairing_max_inflight,
                self.settings.mqtt_client_id,
            )

    @property
    def in_flight(self) -> int:
        """Request messages being processed now."""
        return len(self._tasks)

    def _client_of(self, message: aiomqtt.Message) -> str | None:
        """`<kind>s/<id>` of a request's sender, from its topic; None for a bad topic."""
        parsed = self.scheme.parse_request(message.topic.value)
        if isinstance(parsed, TopicDrop):
            return None
        return f"{parsed.identity.kind.segment}/{parsed.identity.id}"

    def _client_done(self, client: str, _task: asyncio.Task[None]) -> None:
        left = self._per_client[client] - 1
        if left > 0:
            self._per_client[client] = left
        else:
            del self._per_client[client]

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

    def _ack(self, message: aiomqtt.Message) -> None:
        if message.qos > 0:
            with contextlib.suppress(Exception):
                self.client._client.ack(message.mid, message.qos)

    async def _process(self, message: aiomqtt.Message, *, shed: bool = False) -> None:
        try:
            if shed:
                await self._shed(message)
            else:
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

    async def _shed(self, message: aiomqtt.Message) -> None:
        """Answer a request of a client that has its share of the window in flight.

        RATE_LIMITED with `retry_after_s` = `SLOW_DOWN_S` (RFC 8628 "slow_down": wait
        longer before the next request), nothing executed; a heartbeat, which has no
        reply, is only counted.
        """
        self.counters["shed"] += 1
        parsed = self.scheme.parse_request(message.topic.value)
        if isinstance(parsed, TopicDrop) or parsed.op == "heartbeat":
            return
        payload = message.payload
        body = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        reply = error_reply(
            _request_id(bytes(body)),
            PairingErrorCode.RATE_LIMITED,
            "too many requests in flight: slow down",
            SLOW_DOWN_S,
        )
        if self.v5 and self._oversized_property(message) is not None:
            topic = self.scheme.reply_topic(parsed.identity, parsed.op)
            await self._publish_reply(message, topic, reply, self._plain_reply_props, wait=False)
        else:
            await self._reply(message, parsed, reply, wait=False)

    async def _process_inner(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = b"" if payload is None else str(payload).encode()
        parsed = self.scheme.parse_request(message.topic.value)
        if isinstance(parsed, TopicDrop):
            self.counters[f"dropped.{parsed.reason}"] += 1
            return
        if self.v5 and (refused := self._oversized_property(message)) is not None:
            # Not executed: its reply could exceed what the broker accepts from us.
            self.counters[f"refused.{refused}"] += 1
            reply = error_reply(
                _request_id(bytes(payload)),
                PairingErrorCode.INVALID_REQUEST,
                "response topic or correlation data too long",
            )
            await self._publish_reply(
                message, self.scheme.reply_topic(parsed.identity, parsed.op), reply, None
            )
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
        await self._finish(handled)

    async def _finish(self, handled: Handled) -> None:
        """Publish what a request or a status produced (events), then write its history.

        Raises:
            aiomqtt.MqttError: publishing failed (the events stay for the outbox sweep).
        """
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
        if handled.relay:
            await self.publish_events(handled.relay)
        await self.dispatcher.history.record(handled.history)

    @staticmethod
    def _oversized_property(message: aiomqtt.Message) -> str | None:
        """`response_topic_too_long`, `correlation_data_too_long`, or None when within bounds."""
        incoming = message.properties
        if incoming is None:
            return None
        response_topic = getattr(incoming, "ResponseTopic", None)
        if isinstance(response_topic, str) and (
            len(response_topic) > MAX_RESPONSE_TOPIC_BYTES
            or len(response_topic.encode(errors="surrogatepass")) > MAX_RESPONSE_TOPIC_BYTES
        ):
            return "response_topic_too_long"
        correlation = getattr(incoming, "CorrelationData", None)
        if correlation is not None and len(correlation) > MAX_CORRELATION_DATA_BYTES:
            return "correlation_data_too_long"
        return None

    async def _publish_reply(
        self,
        message: aiomqtt.Message,
        topic: str,
        reply: dict[str, Any],
        props: Properties | None,
        *,
        wait: bool = True,
    ) -> None:
        """Publish one reply, never above the broker's Maximum Packet Size.

        With `wait` false the reply is handed to paho's queue (QoS 1, resent after a
        reconnect) and not waited for: for shed requests, whose in-flight slot must be
        free again at once.

        A reply that would be larger is replaced by a short INTERNAL_ERROR on the default
        topic (`topic`'s kind of default is the caller's), without Correlation Data, or
        dropped when even that is too large; either way counted as `reply_oversized`.
        While it is on its way, a connection loss counts against the request (poison).
        """
        body = _COMPACT_JSON.encode(reply).encode()
        if publish_packet_bytes(topic, body, props, v5=self.v5) > self.max_packet_bytes:
            self.counters["reply_oversized"] += 1
            log.warning(
                "a reply on %s would exceed the broker's maximum packet size (%d bytes)",
                topic,
                self.max_packet_bytes,
            )
            parsed = self.scheme.parse_request(message.topic.value)
            if isinstance(parsed, TopicDrop):
                return
            topic = self.scheme.reply_topic(parsed.identity, parsed.op)
            props = self._plain_reply_props
            body = _COMPACT_JSON.encode(
                error_reply(
                    reply.get("request_id"),
                    PairingErrorCode.INTERNAL_ERROR,
                    "the reply is too large for the broker",
                )
            ).encode()
            if publish_packet_bytes(topic, body, props, v5=self.v5) > self.max_packet_bytes:
                return
        if not wait:
            info = self.client._client.publish(topic, body, qos=1, properties=props)
            if info.rc != 0:
                raise aiomqtt.MqttError(f"could not publish a reply (paho rc {info.rc})")
            return
        fingerprint, token = _fingerprint(message), object()
        self._sending[token] = (fingerprint, topic, body)
        try:
            await self.client.publish(topic, body, qos=1, properties=props)
        finally:
            self._sending.pop(token, None)
        self._strikes.pop(fingerprint, None)

    async def _reply(
        self,
        message: aiomqtt.Message,
        req: RequestTopic,
        reply: dict[str, Any],
        *,
        wait: bool = True,
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
                props = self._plain_reply_props
            else:
                props = _reply_properties(correlation, self.settings.pairing_reply_expiry_s)
        await self._publish_reply(message, topic, reply, props, wait=wait)

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
            if publish_packet_bytes(topic, body, None, v5=self.v5) > self.max_packet_bytes:
                # Events are bounded by the service's own limits; a broker set below them
                # would close the connection at every attempt.
                self.counters["event_oversized"] += 1
                log.warning("an event on %s exceeds the broker's maximum packet size", topic)
                continue
            await self.client.publish(topic, body, qos=1)


def _request_id(payload: bytes) -> str | None:
    """The payload's request_id when it can be trusted (docs/protocol.md "Reply envelope")."""
    try:
        return extract_request_id(parse_payload(payload))
    except InvalidPayload as exc:
        return exc.request_id
