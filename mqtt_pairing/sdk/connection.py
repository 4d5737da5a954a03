"""One peer's broker connection: persistent session, reconnect with backoff (aiomqtt).

docs/sdk.md, "Connection and TLS". The connection uses the peer's id as client id with a
persistent session (MQTT 5: clean start off and a Session Expiry Interval; MQTT 3.1.1:
clean session off), so that replies and events published while the peer is away are kept
by the broker and delivered when it is back (docs/protocol.md, "Events"). aiomqtt does not
reconnect by itself: `Connection` reconnects around one reused `aiomqtt.Client` (whose
paho client keeps unacknowledged QoS 1 publishes and sends them again), with capped
exponential backoff and jitter, subscribing again and calling `on_connect` each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqtt_pairing.mqtt_address import BrokerAddress, describe_connect_error
from mqtt_pairing.sdk.errors import ConnectFailed, NotConnected


async def reap(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended.

    Its own CancelledError ends here; a cancellation of the caller while it waits (a
    `wait_for` timeout, Ctrl-C) is passed on, not swallowed, so that a close under a
    deadline cannot outlive it. Other errors of the task are the caller's to handle.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


__all__ = ["Connection", "ProtocolChoice"]

log = logging.getLogger(__name__)

ProtocolChoice = Literal["5", "3.1.1", "auto"]
"""MQTT version; "auto" tries 5 first and falls back to 3.1.1 on the first connection."""

# CONNACK codes that no retry can fix: bad credentials, not authorised, banned, bad id.
_REFUSED_V311 = frozenset({2, 4, 5})
_REFUSED_V5 = frozenset({133, 134, 135, 138, 140})

_PROBE_TIMEOUT_S = 3.0
"""With "auto", how long the MQTT 5 CONNACK may take before 3.1.1 is tried."""

OnConnect = Callable[[aiomqtt.Client], Awaitable[None]]
OnMessage = Callable[[aiomqtt.Message], None]


def _rc_value(exc: aiomqtt.MqttError) -> int | None:
    rc = getattr(exc, "rc", None)
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc if isinstance(rc, int) else None


class Connection:
    """A broker connection that comes back by itself.

    Args:
        address: the broker (`BrokerAddress.from_url("mqtts://id:pw@host")`).
        client_id: the MQTT client id: the peer's id (the shipped broker config forces the
            username anyway, docs/security.md).
        protocol: "5", "3.1.1" or "auto".
        session_expiry_s: MQTT 5 Session Expiry Interval, seconds: how long the broker
            keeps the session (subscriptions, queued events) while the peer is away;
            0 makes a clean, non-persistent session (MQTT 3.1.1: clean session on).
        keepalive_s: MQTT keep alive, seconds.
        subscriptions: topic filters subscribed at QoS 1 on every connection.
        on_message: called for every message received (in the event loop, must not block).
        on_connect: awaited after every (re)connection and subscription, before requests
            are let through (a runner announces its presence there).
        will: the Last Will (a runner's retained `offline` status).
        reconnect_first_s: first backoff delay, seconds.
        reconnect_max_s: backoff cap, seconds.
        connect_timeout_s: how long `open` tries before giving up.
        retry_first_connect: False gives up on the first failed attempt (each version
            once with "auto") instead of trying until `connect_timeout_s`.

    Attributes:
        connected: set while connected (after `on_connect`).
        generation: how many times it connected; a request sent in an earlier generation
            is sent again.
        protocol: the MQTT version in use once connected ("5" or "3.1.1").
    """

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        protocol: ProtocolChoice = "5",
        session_expiry_s: int = 86_400,
        keepalive_s: int = 30,
        subscriptions: Iterable[str] = (),
        on_message: OnMessage,
        on_connect: OnConnect | None = None,
        will: aiomqtt.Will | None = None,
        reconnect_first_s: float = 0.2,
        reconnect_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,
        retry_first_connect: bool = True,
    ) -> None:
        self.address = address
        self.retry_first_connect = retry_first_connect
        self.client_id = client_id
        self.session_expiry_s = session_expiry_s
        self.keepalive_s = keepalive_s
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self.will = will
        self.reconnect_first_s = reconnect_first_s
        self.reconnect_max_s = reconnect_max_s
        self.connect_timeout_s = connect_timeout_s
        self.connected = asyncio.Event()
        self.lost = asyncio.Event()
        self.generation = 0
        self._versions: list[Literal["5", "3.1.1"]] = (
            ["5", "3.1.1"] if protocol == "auto" else [protocol]
        )
        self.protocol: Literal["5", "3.1.1"] = self._versions[0]
        self._clients: dict[str, aiomqtt.Client] = {}
        self._task: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._closing = False

    @property
    def client(self) -> aiomqtt.Client:
        """The aiomqtt client of the version in use (for raw publishes in tests)."""
        return self._client_for(self.protocol)

    def _client_for(self, version: Literal["5", "3.1.1"]) -> aiomqtt.Client:
        client = self._clients.get(version)
        if client is None:
            client = self._make_client(version)
            self._clients[version] = client
        return client

    def _make_client(self, version: Literal["5", "3.1.1"]) -> aiomqtt.Client:
        persistent = self.session_expiry_s > 0
        kwargs: dict[str, Any] = {}
        if version == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self.session_expiry_s
            kwargs.update(
                protocol=aiomqtt.ProtocolVersion.V5, clean_start=not persistent, properties=props
            )
        else:
            kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=not persistent)
        will = self.will
        if will is not None and version != "5" and will.properties is not None:
            will = aiomqtt.Will(will.topic, will.payload, will.qos, will.retain)
        return aiomqtt.Client(
            **self.address.client_options(),  # host, credentials, verified TLS, NODELAY
            identifier=self.client_id,
            keepalive=self.keepalive_s,
            will=will,
            timeout=10,
            **kwargs,
        )

    async def open(self) -> None:
        """Connect, and keep reconnecting in the background until `close`.

        Raises:
            ConnectFailed: the broker refused the credentials or client id, or no
                connection was made within `connect_timeout_s`.
        """
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"mqtt-pairing:{self.client_id}")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), self.connect_timeout_s)
        except TimeoutError:
            await self.close()
            raise ConnectFailed(
                f"no connection to {self.address.where} within {self.connect_timeout_s:g} s"
            ) from None
        except ConnectFailed:
            await self.close()
            raise

    async def close(self, before: OnConnect | None = None) -> None:
        """Stop reconnecting and disconnect normally (the Last Will is not sent).

        Args:
            before: awaited first while still connected (a runner says `offline`); its
                broker errors are ignored.
        """
        self._closing = True
        if before is not None and self.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                await asyncio.wait_for(before(self.client), 5)
        if self._task is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await reap(self._task)
        self.connected.clear()

    async def wait_connected(self, deadline: float) -> None:
        """Wait until connected, at most until the loop time `deadline`.

        Raises:
            NotConnected: not connected by then, or closed.
        """
        if self._closing:
            raise NotConnected("the client is closed")
        if self.connected.is_set():
            return
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(self.connected.wait(), max(remaining, 0))
        except TimeoutError:
            raise NotConnected("not connected to the broker") from None

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        deadline: float,
        properties: Properties | None = None,
    ) -> int:
        """Publish at QoS 1 once connected, again after a reconnect if it failed.

        Args:
            topic: the topic.
            payload: the bytes.
            retain: the retain flag.
            deadline: loop time by which it must be acknowledged by the broker.
            properties: MQTT 5 publish properties (ignored on 3.1.1).

        Returns:
            The generation (connection) it was acknowledged in.

        Raises:
            NotConnected: not acknowledged by `deadline`.
        """
        loop = asyncio.get_running_loop()
        while True:
            await self.wait_connected(deadline)
            generation = self.generation
            remaining = deadline - loop.time()
            try:
                await self.client.publish(
                    topic,
                    payload,
                    qos=1,
                    retain=retain,
                    properties=properties if self.protocol == "5" else None,
                    timeout=max(remaining, 0.001),
                )
            except aiomqtt.MqttError as exc:
                if loop.time() >= deadline:
                    raise NotConnected(f"publish not acknowledged: {exc}") from None
                # Lost meanwhile: wait for the next connection (bounded by the deadline).
                if self.connected.is_set() and self.generation == generation:
                    await asyncio.sleep(0.05)
                continue
            return generation

    def _abandon(self, version: str) -> None:
        """Drop the client of a version "auto" gives up on, closing its socket.

        A CONNECT that timed out leaves paho's socket open (the broker would wait on it):
        paho's own `disconnect()` queues a DISCONNECT and closes the socket once it is
        written, through aiomqtt's socket callbacks (aiomqtt 2.5 keeps the paho client in
        `_client`; tests/sdk/test_connection.py pins this).
        """
        client = self._clients.pop(version, None)
        if client is not None:
            with contextlib.suppress(Exception):
                client._client.disconnect()

    def _describe(self, exc: aiomqtt.MqttError) -> str:
        return describe_connect_error(exc, self.address)

    async def _run(self) -> None:
        backoff = self.reconnect_first_s
        attempt = 0
        while not self._closing:
            version = self._versions[attempt % len(self._versions)]
            client = self._client_for(version)
            probing = len(self._versions) > 1 and version == "5"
            timeout_s = client.timeout
            if probing:
                # amqtt (MQTT 3.1.1 only) answers an MQTT 5 CONNECT with a Last Will with
                # silence: do not wait the whole client timeout before trying 3.1.1.
                client.timeout = _PROBE_TIMEOUT_S
            try:
                async with client:
                    client.timeout = timeout_s
                    self.protocol = version
                    self._versions = [version]  # "auto" is decided once
                    for topic_filter in self.subscriptions:
                        await client.subscribe(topic_filter, qos=1)
                    if self.on_connect is not None:
                        await self.on_connect(client)
                    self.generation += 1
                    self.lost.clear()
                    self.connected.set()
                    if self._first is not None and not self._first.done():
                        self._first.set_result(None)
                    backoff = self.reconnect_first_s
                    log.info("%s connected (MQTT %s)", self.client_id, version)
                    async for message in client.messages:
                        self.on_message(message)
            except aiomqtt.MqttError as exc:
                client.timeout = timeout_s
                self.connected.clear()
                self.lost.set()
                if self._closing:
                    return
                code = _rc_value(exc)
                refused = _REFUSED_V5 if version == "5" else _REFUSED_V311
                if self._first is not None and not self._first.done():
                    if isinstance(exc, MqttConnectError) and code in refused:
                        self._first.set_exception(ConnectFailed(self._describe(exc)))
                        return
                    attempt += 1
                    if len(self._versions) > 1:
                        self._abandon(version)
                    if len(self._versions) > 1 and attempt % len(self._versions):
                        continue  # "auto": the other version at once
                    if not self.retry_first_connect:
                        self._first.set_exception(ConnectFailed(self._describe(exc)))
                        return
                delay = min(backoff, self.reconnect_max_s) * random.uniform(0.5, 1.0)
                log.warning(
                    "%s: connection lost (%s); retrying in %.1f s", self.client_id, exc, delay
                )
                await asyncio.sleep(delay)
                backoff = min(backoff * 2, self.reconnect_max_s)
            else:
                # The message iterator ended without an error: a normal disconnect.
                self.connected.clear()
                self.lost.set()
