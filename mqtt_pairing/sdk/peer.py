"""What runners and apps share: requests and replies, events, de-duplication.

A request is published at QoS 1 with a fresh `request_id` (UUID 4) and its reply matched by
`request_id` (MQTT 5 and 3.1.1 alike, docs/protocol.md "Reply envelope"). If the
connection is lost before the reply comes, the same request (same `request_id`) is sent
again once reconnected: the service answers a repeat with the remembered reply and no
second effect (docs/protocol.md, "Idempotency"); the same happens when no reply has come
after `resend_after_s` (5 s; a broker that crashed may have lost the service's
subscription until it came back). Events are dropped when their `event_id` was seen
already (the last 4096 are remembered). Events are handed out in the order they came; an
event the SDK holds back (a runner's `session.opened` while the end-to-end exchange runs,
docs/sdk.md "End-to-end keys and SAS") holds back those after it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Coroutine
from types import TracebackType
from typing import Any, ClassVar, Self

import aiomqtt
from pydantic import TypeAdapter, ValidationError

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sdk.connection import Connection, ProtocolChoice, reap
from mqtt_pairing.sdk.errors import NoReply, NotConnected, ReplyError
from mqtt_pairing.sdk.wire import Event, MessageResult
from mqtt_pairing.topics import Identity, Kind, TopicScheme

__all__ = ["Peer"]

log = logging.getLogger(__name__)

_SEEN_EVENTS = 4096
_RESEND_AFTER_S = 5.0
"""A request with no reply after this long is sent again (same request_id)."""
_EVENTS: TypeAdapter[Event] = TypeAdapter(Event)


class Peer:
    """A runner or app connected to the service's broker (base of both clients).

    Args:
        ident: the runner or app id (`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`), which is also
            the MQTT username on the shipped broker config.
        address: the broker; TLS URLs are verified.
        prefix: topic prefix (`PAIRING_TOPIC_PREFIX` of the service).
        protocol: "5", "3.1.1" or "auto".
        client_id: MQTT client id; default the id itself (a stable id: the broker keeps
            the session while the peer is away).
        session_expiry_s: how long the broker keeps the session while away, seconds
            (MQTT 5); 0 for a clean session that ends with the connection.
        keepalive_s: MQTT keep alive, seconds.
        request_timeout_s: default time a request may take, reconnects included.
        reconnect_max_s: cap of the reconnect backoff, seconds.
        connect_timeout_s: how long the first connection may take.
        resend_after_s: a request with no reply after this long is sent again (same
            `request_id`); None never sends one again on the same connection.
        retry_first_connect: keep trying the first connection until `connect_timeout_s`;
            False gives up after one attempt (each version, with protocol "auto").

    Raises:
        ValueError: a malformed id or prefix.
    """

    kind: ClassVar[Kind]

    def __init__(
        self,
        ident: str,
        address: BrokerAddress,
        *,
        prefix: str = "pairing",
        protocol: ProtocolChoice = "5",
        client_id: str | None = None,
        session_expiry_s: int = 86_400,
        keepalive_s: int = 30,
        request_timeout_s: float = 15.0,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        resend_after_s: float | None = _RESEND_AFTER_S,
        retry_first_connect: bool = True,
    ) -> None:
        self.identity = Identity(self.kind, ident)
        self.resend_after_s = resend_after_s
        self.scheme = TopicScheme(prefix)
        self.request_timeout_s = request_timeout_s
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self._order: deque[_Slot] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        base = f"{self.scheme.prefix}/{self.kind.segment}/{ident}"
        self.connection = Connection(
            address,
            client_id or ident,
            protocol=protocol,
            session_expiry_s=session_expiry_s,
            keepalive_s=keepalive_s,
            subscriptions=(f"{base}/res/+", self.scheme.events_topic(self.identity)),
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=self._will(),
            reconnect_max_s=reconnect_max_s,
            connect_timeout_s=connect_timeout_s,
            retry_first_connect=retry_first_connect,
        )

    @property
    def id(self) -> str:
        """The runner or app id."""
        return self.identity.id

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (and keep reconnecting until `close`).

        Raises:
            ConnectFailed: refused credentials, or no connection within the timeout.
        """
        await self.connection.open()

    async def close(self) -> None:
        """Disconnect normally; the broker keeps the session for `session_expiry_s`."""
        await self.connection.close(self._before_close)
        for task in list(self._tasks):
            await reap(task)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _will(self) -> aiomqtt.Will | None:
        return None

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        """Called after each (re)connection, subscribed, before requests go out."""

    async def _before_close(self, client: aiomqtt.Client) -> None:
        """Called by `close` while still connected."""

    # -- requests --------------------------------------------------------------------

    async def request(
        self,
        op: str,
        body: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Send a request and wait for its reply envelope (success or error).

        A `request_id` (UUID 4) is added unless `body` has one. Across a reconnect the
        same request is sent again, so the wait spans broker restarts.

        Args:
            op: the op (`code`, `pair`, ...).
            body: the request fields.
            timeout_s: the whole wait, seconds (default `request_timeout_s`).

        Returns:
            The reply envelope `{"request_id", "ok", "result" | "error"}`.

        Raises:
            NoReply: no reply in time.
        """
        timeout = self.request_timeout_s if timeout_s is None else timeout_s
        payload = dict(body or {})
        request_id = str(payload.setdefault("request_id", str(uuid.uuid4())))
        data = json.dumps(payload, separators=(",", ":")).encode()
        topic = self.scheme.request_topic(self.identity, op)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[request_id] = future
        connection = self.connection
        try:
            sent_in = -1
            resend_at = 0.0
            while not future.done():
                if not connection.connected.is_set() or connection.generation != sent_in:
                    try:
                        sent_in = await connection.publish(topic, data, deadline=deadline)
                    except NotConnected:
                        raise NoReply(op, request_id, timeout) from None
                    resend_at = loop.time() + (self.resend_after_s or math.inf)
                    continue
                lost: asyncio.Future[Any] = asyncio.ensure_future(connection.lost.wait())
                try:
                    await asyncio.wait(
                        {future, lost},
                        timeout=max(min(deadline, resend_at) - loop.time(), 0),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    lost.cancel()
                if future.done():
                    break
                if loop.time() >= deadline:
                    raise NoReply(op, request_id, timeout)
                if loop.time() >= resend_at:
                    # Acknowledged by the broker, but perhaps before the service had
                    # subscribed again (a broker that lost its sessions): the same request
                    # once more. A repeat has no second effect.
                    sent_in = -1
            return future.result()
        finally:
            self._waiting.pop(request_id, None)

    async def call(
        self, op: str, body: dict[str, Any] | None = None, *, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Like `request`, but return the `result` of a success.

        Raises:
            ReplyError: the reply is an error.
            NoReply: no reply in time.
        """
        reply = await self.request(op, body, timeout_s=timeout_s)
        if reply.get("ok") is not True:
            raise ReplyError(reply)
        result = reply.get("result")
        return result if isinstance(result, dict) else {}

    async def message(
        self, session_id: str, data: dict[str, Any], *, timeout_s: float | None = None
    ) -> None:
        """Send `data` to the other party of a session (`message`).

        docs/protocol.md, "Runner and app message": the other party receives a
        `SessionMessage`.

        Args:
            session_id: one of this peer's active sessions.
            data: a JSON object of at most 1024 bytes (compact UTF-8 JSON). Objects whose
                `type` starts with `sas.` belong to the SDK's end-to-end exchange.
            timeout_s: request timeout, seconds.

        Raises:
            ReplyError: SESSION_NOT_FOUND, RATE_LIMITED, INVALID_REQUEST (too large).
            NoReply: no reply in time.
        """
        body = {"session_id": session_id, "data": data}
        MessageResult.model_validate(await self.call("message", body, timeout_s=timeout_s))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background until it ends or `close` cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def publish_raw(self, op: str, payload: bytes, *, timeout_s: float = 10.0) -> None:
        """Publish bytes on one of this peer's request topics (QoS 1), with no reply awaited.

        Raises:
            NotConnected: not acknowledged by the broker in time.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        await self.connection.publish(
            self.scheme.request_topic(self.identity, op), payload, deadline=deadline
        )

    # -- events ----------------------------------------------------------------------

    async def next_event(self, timeout_s: float | None = None) -> Any:  # noqa: ANN401
        """The next event, duplicates dropped (`SessionOpened`, `SessionClosed`, ...).

        Raises:
            TimeoutError: none within `timeout_s` seconds (None: wait for ever).
        """
        return self._deliver(await asyncio.wait_for(self._events.get(), timeout_s))

    async def events(self) -> AsyncIterator[Any]:
        """Every event as it comes, duplicates dropped; reconnects are invisible here."""
        while True:
            yield self._deliver(await self._events.get())

    def _deliver(self, event: Any) -> Any:  # noqa: ANN401
        """Last touches as the caller takes an event (the app adds its SAS here)."""
        return event

    def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        try:
            body = json.loads(payload)
        except ValueError:
            log.warning("%s: a message that is not JSON on %s dropped", self.id, message.topic)
            return
        if not isinstance(body, dict):
            return
        if message.topic.value.endswith("/events"):
            event_id = body.get("event_id")
            if not isinstance(event_id, str) or event_id in self._seen:
                return
            self._seen[event_id] = None
            if len(self._seen) > _SEEN_EVENTS:
                self._seen.popitem(last=False)
            event = self._parse_event(body)
            if event is not None:
                self._emit(event)
            return
        future = self._waiting.pop(str(body.get("request_id")), None)
        if future is not None and not future.done():
            future.set_result(body)

    def _emit(self, event: Any, *, ready: bool = True) -> _Slot:  # noqa: ANN401
        """Queue an event in arrival order; one not `ready` holds back those after it."""
        slot = _Slot(event, ready)
        self._order.append(slot)
        self._flush()
        return slot

    def _release(self, slot: _Slot) -> None:
        """Let a held event (and those behind it) go out."""
        slot.ready = True
        self._flush()

    def _flush(self) -> None:
        while self._order and self._order[0].ready:
            self._events.put_nowait(self._order.popleft().event)

    def _parse_event(self, body: dict[str, Any]) -> Any:  # noqa: ANN401
        """The typed event (None to drop it); subclasses add what they derive."""
        try:
            return _EVENTS.validate_python(body)
        except ValidationError:
            log.warning("%s: an event of unknown shape dropped (%s)", self.id, body.get("event"))
            return None


class _Slot:
    """An event in the order of arrival; `ready` once it may be handed out."""

    __slots__ = ("event", "ready")

    def __init__(self, event: Any, ready: bool) -> None:  # noqa: ANN401
        self.event = event
        self.ready = ready
