"""RunnerClient and AppClient: the protocol from the other side (docs/protocol.md).

Small asyncio clients over aiomqtt, used by the simulated `runner` and `app` commands,
the tests and the benchmarks. Replies are matched to requests by `request_id` (which
works for MQTT 3.1.1 and 5 alike); events arrive on a queue, with duplicates (same
`event_id`) dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from types import TracebackType
from typing import Any, Literal, Self

import aiomqtt

from mqtt_pairing.mqtt_address import BrokerAddress, open_connection
from mqtt_pairing.topics import Identity, Kind, TopicScheme

_DEFAULT_TIMEOUT_S = 10.0


class ReplyError(Exception):
    """An error reply; `code`, `message` and `retry_after_s` as on the wire."""

    def __init__(self, reply: dict[str, Any]) -> None:
        error = reply.get("error") or {}
        self.reply = reply
        self.code: str = str(error.get("code", "INTERNAL_ERROR"))
        self.message: str = str(error.get("message", ""))
        self.retry_after_s: int | None = error.get("retry_after_s")
        super().__init__(f"{self.code}: {self.message}")


class PairingClient:
    """One runner or app connected to the broker.

    Args:
        kind: runner or app.
        ident: its id (the broker binds it to the username in production).
        address: the broker.
        prefix: topic prefix (`PAIRING_TOPIC_PREFIX`).
        protocol: "5" or "3.1.1".
        client_id: MQTT client id (default: `<kind>-<id>-<random>`).
        will: a Last Will (topic, payload, retain) for runners' presence.
    """

    def __init__(
        self,
        kind: Kind,
        ident: str,
        address: BrokerAddress,
        *,
        prefix: str = "pairing",
        protocol: Literal["5", "3.1.1"] = "5",
        client_id: str | None = None,
        will: aiomqtt.Will | None = None,
    ) -> None:
        self.identity = Identity(kind, ident)
        self.scheme = TopicScheme(prefix)
        self.address = address
        self.protocol = protocol
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._seen_events: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self.client = aiomqtt.Client(
            **address.client_options(),  # host, credentials, transport, verified TLS, NODELAY
            identifier=client_id or f"{kind.value}-{ident}-{uuid.uuid4().hex[:8]}"[:64],
            protocol=(
                aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
            ),
            will=will,
            timeout=_DEFAULT_TIMEOUT_S,
        )

    async def __aenter__(self) -> Self:
        """Connect and subscribe to the client's replies and events.

        Raises:
            BrokerUnreachable: the connection failed (a one-line message; an
                `aiomqtt.MqttError`).
        """
        await open_connection(self.client, self.address)
        base = f"{self.scheme.prefix}/{self.identity.kind.segment}/{self.identity.id}"
        await self.client.subscribe(f"{base}/res/+", qos=1)
        await self.client.subscribe(self.scheme.events_topic(self.identity), qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self.client.messages:
            self._handle(message)

    def _handle(self, message: aiomqtt.Message) -> None:
        """Route one incoming message: an event to `events`, a reply to its request."""
        try:
            body = json.loads(bytes(message.payload))
        except (ValueError, TypeError):
            return
        if not isinstance(body, dict):
            return
        if "event" in body:
            event_id = str(body.get("event_id"))
            if event_id in self._seen_events:
                return
            self._seen_events.add(event_id)
            self.events.put_nowait(body)
            return
        future = self._waiting.pop(str(body.get("request_id")), None)
        if future is not None and not future.done():
            future.set_result(body)

    async def publish_raw(self, op: str, payload: bytes, **publish_kwargs: Any) -> None:  # noqa: ANN401
        """Publish raw bytes on one of this client's request topics (for tests)."""
        topic = self.scheme.request_topic(self.identity, op)
        await self.client.publish(topic, payload, qos=1, **publish_kwargs)

    async def request(
        self, op: str, body: dict[str, Any] | None = None, *, timeout_s: float = _DEFAULT_TIMEOUT_S
    ) -> dict[str, Any]:
        """Send a request and wait for its reply envelope.

        A `request_id` (UUID) is added unless `body` has one.

        Raises:
            TimeoutError: no reply within `timeout_s` seconds.
        """
        payload = dict(body or {})
        request_id = str(payload.setdefault("request_id", str(uuid.uuid4())))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self.publish_raw(op, json.dumps(payload).encode())
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._waiting.pop(request_id, None)

    async def call(
        self, op: str, body: dict[str, Any] | None = None, *, timeout_s: float = _DEFAULT_TIMEOUT_S
    ) -> dict[str, Any]:
        """Like `request`, but return the `result` of a success.

        Raises:
            ReplyError: the reply is an error.
            TimeoutError: no reply in time.
        """
        reply = await self.request(op, body, timeout_s=timeout_s)
        if not reply.get("ok"):
            raise ReplyError(reply)
        result: dict[str, Any] = reply["result"]
        return result

    async def next_event(self, timeout_s: float = _DEFAULT_TIMEOUT_S) -> dict[str, Any]:
        """The next event (duplicates dropped).

        Raises:
            TimeoutError: none within `timeout_s` seconds.
        """
        return await asyncio.wait_for(self.events.get(), timeout_s)


class RunnerClient(PairingClient):
    """A runner: asks for codes, hears of pairings, publishes its presence."""

    def __init__(self, ident: str, address: BrokerAddress, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(Kind.RUNNER, ident, address, **kwargs)

    async def request_code(self, **fields: Any) -> dict[str, Any]:  # noqa: ANN401
        """`code` op: fields ttl_s, max_uses, runner_name, metadata, public_key.

        Raises:
            ReplyError: an error reply. TimeoutError: no reply.
        """
        return await self.call("code", fields)

    async def cancel_code(self) -> bool:
        """`cancel-code` op; True if a live code was cancelled."""
        return bool((await self.call("cancel-code"))["cancelled"])

    async def sessions(self) -> list[dict[str, Any]]:
        """`sessions` op: the runner's active sessions."""
        return list((await self.call("sessions"))["sessions"])

    async def unpair(self, **which: Any) -> int:  # noqa: ANN401
        """`unpair` op with session_id=, app_id= or all=True; how many closed."""
        return int((await self.call("unpair", which))["closed"])

    async def heartbeat(self) -> None:
        """`heartbeat` op (no reply unless it fails)."""
        await self.publish_raw("heartbeat", b"{}")

    async def publish_status(self, state: Literal["online", "offline"]) -> None:
        """Publish the retained presence status."""
        topic = self.scheme.status_topic(self.identity.id)
        await self.client.publish(topic, json.dumps({"state": state}), qos=1, retain=True)


class AppClient(PairingClient):
    """An app: pairs with codes, lists and closes its sessions."""

    def __init__(self, ident: str, address: BrokerAddress, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(Kind.APP, ident, address, **kwargs)

    async def pair(self, code: str, **fields: Any) -> dict[str, Any]:  # noqa: ANN401
        """`pair` op: fields app_name, metadata, public_key, request_id.

        Raises:
            ReplyError: an error reply. TimeoutError: no reply.
        """
        return await self.call("pair", {"code": code, **fields})

    async def sessions(self) -> list[dict[str, Any]]:
        """`sessions` op: the app's active sessions."""
        return list((await self.call("sessions"))["sessions"])

    async def unpair(self, session_id: str) -> int:
        """`unpair` op for one of the app's sessions."""
        return int((await self.call("unpair", {"session_id": session_id}))["closed"])

    async def status(self) -> dict[str, Any]:
        """`status` op: paired runners and their presence."""
        return await self.call("status")
