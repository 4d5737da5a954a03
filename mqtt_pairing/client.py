"""Raw protocol clients for tests and benchmarks: the SDK's connection, dict results.

Runner and app authors want `mqtt_pairing.sdk` (typed results, the SAS, presence, a
persistent session). These thin adapters over the same `mqtt_pairing.sdk.peer.Peer` keep
what tests need: replies and events as the JSON objects on the wire, a random client id
with a clean session (so that many test clients may share an id), requests sent once per
connection, and the first connection tried once.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import aiomqtt

from mqtt_pairing.mqtt_address import BrokerAddress, BrokerUnreachable
from mqtt_pairing.sdk.errors import ConnectFailed, ReplyError
from mqtt_pairing.sdk.peer import Peer
from mqtt_pairing.topics import Kind

__all__ = ["AppClient", "PairingClient", "ReplyError", "RunnerClient"]

_DEFAULT_TIMEOUT_S = 10.0


class PairingClient(Peer):
    """One runner or app, raw: `request`/`call` return dicts, events are dicts.

    Args:
        ident: its id.
        address: the broker.
        prefix: topic prefix (`PAIRING_TOPIC_PREFIX`).
        protocol: "5" or "3.1.1".
        client_id: MQTT client id (default: `<kind>-<id>-<random>`).
        will: a Last Will (topic, payload, retain).
    """

    def __init__(
        self,
        ident: str,
        address: BrokerAddress,
        *,
        prefix: str = "pairing",
        protocol: Literal["5", "3.1.1"] = "5",
        client_id: str | None = None,
        will: aiomqtt.Will | None = None,
    ) -> None:
        self._given_will = will
        super().__init__(
            ident,
            address,
            prefix=prefix,
            protocol=protocol,
            client_id=client_id or f"{self.kind.value}-{ident}-{uuid.uuid4().hex[:8]}"[:64],
            session_expiry_s=0,
            request_timeout_s=_DEFAULT_TIMEOUT_S,
            reconnect_max_s=1.0,
            resend_after_s=None,
            retry_first_connect=False,
        )

    @property
    def client(self) -> aiomqtt.Client:
        """The aiomqtt client (raw publishes)."""
        return self.connection.client

    def _will(self) -> aiomqtt.Will | None:
        return self._given_will

    async def open(self) -> None:
        """Connect once.

        Raises:
            BrokerUnreachable: the connection failed (a one-line message; an
                `aiomqtt.MqttError`).
        """
        try:
            await super().open()
        except ConnectFailed as exc:
            raise BrokerUnreachable(str(exc)) from None

    def _on_message(self, message: aiomqtt.Message) -> None:
        self._handle(message)

    def _handle(self, message: aiomqtt.Message) -> None:
        """Route one incoming message: an event to the events, a reply to its request."""
        super()._on_message(message)

    def _parse_event(self, body: dict[str, Any]) -> Any:  # noqa: ANN401
        return body

    async def next_event(self, timeout_s: float | None = _DEFAULT_TIMEOUT_S) -> Any:  # noqa: ANN401
        """The next event as a dict, duplicates dropped.

        Raises:
            TimeoutError: none within `timeout_s` seconds.
        """
        return await super().next_event(timeout_s)


class RunnerClient(PairingClient):
    """A runner, raw: asks for codes, hears of pairings, publishes its presence."""

    kind = Kind.RUNNER

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
        payload = f'{{"state": "{state}"}}'.encode()
        await self.client.publish(topic, payload, qos=1, retain=True)


class AppClient(PairingClient):
    """An app, raw: pairs with codes, lists and closes its sessions."""

    kind = Kind.APP

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
