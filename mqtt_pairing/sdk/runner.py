"""RunnerClient: asks for codes, hears of pairings, announces its presence.

Presence (docs/protocol.md, "Presence"): on every connection the runner publishes a
retained `{"state": "online"}` on its status topic; its Last Will is a retained
`{"state": "offline"}`, sent by the broker if the connection dies and (MQTT 5) the
runner has not come back within `will_delay_s`; `close` publishes `offline` itself.
Optional heartbeats keep it online for the service where statuses are not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sdk.e2e import RunnerKeyRing, agree
from mqtt_pairing.sdk.peer import Peer
from mqtt_pairing.sdk.wire import (
    CancelCodeResult,
    CodeResult,
    Session,
    SessionOpened,
    SessionsResult,
    UnpairResult,
)
from mqtt_pairing.topics import Kind

__all__ = ["RunnerClient"]

log = logging.getLogger(__name__)

_ONLINE = json.dumps({"state": "online"}).encode()
_OFFLINE = json.dumps({"state": "offline"}).encode()


class RunnerClient(Peer):
    """A runner (docs/sdk.md, "Runners").

    Args:
        ident: the runner id (also its MQTT username on the shipped broker config).
        address: the broker.
        name: `runner_name` sent with each code unless a call gives another.
        presence: announce `online` / `offline` on the status topic, with a Last Will.
        will_delay_s: MQTT 5 Will Delay Interval, seconds: a connection lost for less
            than this never shows the runner offline (ignored on MQTT 3.1.1).
        heartbeat_s: send a `heartbeat` this often, seconds; None for none.
        **options: `Peer` options (prefix, protocol, session_expiry_s, ...).
    """

    kind = Kind.RUNNER

    def __init__(
        self,
        ident: str,
        address: BrokerAddress,
        *,
        name: str | None = None,
        presence: bool = True,
        will_delay_s: int = 30,
        heartbeat_s: float | None = None,
        **options: Any,  # noqa: ANN401
    ) -> None:
        self.name = name
        self.presence = presence
        self.will_delay_s = will_delay_s
        self.heartbeat_s = heartbeat_s
        self.keys = RunnerKeyRing()
        self._heartbeats: asyncio.Task[None] | None = None
        super().__init__(ident, address, **options)

    @property
    def status_topic(self) -> str:
        """`P/runners/{id}/status`."""
        return self.scheme.status_topic(self.id)

    def _will(self) -> aiomqtt.Will | None:
        if not self.presence:
            return None
        props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
        props.WillDelayInterval = self.will_delay_s
        return aiomqtt.Will(self.status_topic, _OFFLINE, qos=1, retain=True, properties=props)

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        if self.presence:
            await client.publish(self.status_topic, _ONLINE, qos=1, retain=True)

    async def _before_close(self, client: aiomqtt.Client) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if self.presence:
            await client.publish(self.status_topic, _OFFLINE, qos=1, retain=True)

    async def open(self) -> None:
        """Connect, announce presence, start heartbeats (see `Peer.open`).

        Raises:
            ConnectFailed: refused credentials, or no connection within the timeout.
        """
        await super().open()
        if self.heartbeat_s is not None:
            self._heartbeats = asyncio.create_task(self._beat(self.heartbeat_s))

    async def close(self) -> None:
        """Say `offline`, stop heartbeats and disconnect normally."""
        await super().close()
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats

    async def _beat(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(Exception):
                await self.heartbeat()

    # -- ops -------------------------------------------------------------------------

    async def request_code(
        self,
        *,
        ttl_s: int | None = None,
        max_uses: int | None = None,
        runner_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        e2e: bool = True,
        timeout_s: float | None = None,
    ) -> CodeResult:
        """Ask for a pairing code (`code` op, docs/protocol.md "Runner code").

        A new code replaces the previous one. With `e2e`, a fresh X25519 key pair goes
        with it, and `pairing_uri` gets `&key=<key id>` for the QR code.

        Args:
            ttl_s: seconds the code lives (the service clamps it, default 600).
            max_uses: pairings the code allows (clamped, default 1).
            runner_name: shown to apps (default the client's `name`).
            metadata: a JSON object of at most 1024 bytes relayed to apps.
            e2e: send a public key, so that both sides get a SAS.
            timeout_s: request timeout, seconds.

        Returns:
            The code, its expiry and `pairing_uri`.

        Raises:
            ReplyError: e.g. RATE_LIMITED, BANNED. NoReply: no reply in time.
        """
        fields: dict[str, Any] = {}
        if ttl_s is not None:
            fields["ttl_s"] = ttl_s
        if max_uses is not None:
            fields["max_uses"] = max_uses
        if (runner_name or self.name) is not None:
            fields["runner_name"] = runner_name or self.name
        if metadata is not None:
            fields["metadata"] = metadata
        pair = self.keys.new() if e2e else None
        if pair is not None:
            fields["public_key"] = pair.wire()
        result = CodeResult.model_validate(await self.call("code", fields, timeout_s=timeout_s))
        if pair is None:
            return result
        return result.model_copy(update={"pairing_uri": f"{result.pairing_uri}&key={pair.key_id}"})

    async def cancel_code(self, *, timeout_s: float | None = None) -> bool:
        """Cancel the current code (`cancel-code`); True if a live code was cancelled.

        Raises:
            ReplyError: an error reply. NoReply: no reply in time.
        """
        raw = await self.call("cancel-code", timeout_s=timeout_s)
        return CancelCodeResult.model_validate(raw).cancelled

    async def sessions(self, *, timeout_s: float | None = None) -> list[Session]:
        """The runner's active sessions (`sessions`).

        Raises:
            ReplyError: an error reply. NoReply: no reply in time.
        """
        raw = await self.call("sessions", timeout_s=timeout_s)
        return SessionsResult.model_validate(raw).sessions

    async def unpair(
        self,
        *,
        session_id: str | None = None,
        app_id: str | None = None,
        all: bool = False,  # noqa: A002 - the wire field's name
        timeout_s: float | None = None,
    ) -> int:
        """Close sessions (`unpair`): exactly one of `session_id`, `app_id`, `all=True`.

        Returns:
            How many sessions closed.

        Raises:
            ValueError: not exactly one selector given.
            ReplyError: e.g. SESSION_NOT_FOUND. NoReply: no reply in time.
        """
        which: dict[str, Any] = {}
        if session_id is not None:
            which["session_id"] = session_id
        if app_id is not None:
            which["app_id"] = app_id
        if all:
            which["all"] = True
        if len(which) != 1:
            raise ValueError("give exactly one of session_id, app_id, all=True")
        raw = await self.call("unpair", which, timeout_s=timeout_s)
        return UnpairResult.model_validate(raw).closed

    async def heartbeat(self, *, timeout_s: float = 10.0) -> None:
        """Send a `heartbeat` (no reply unless it fails; docs/protocol.md "Presence").

        Raises:
            NotConnected: not acknowledged by the broker in time.
        """
        await self.publish_raw("heartbeat", b"{}", timeout_s=timeout_s)

    def _parse_event(self, body: dict[str, Any]) -> Any:  # noqa: ANN401
        event = super()._parse_event(body)
        if isinstance(event, SessionOpened) and event.app_public_key is not None:
            found = self.keys.for_app_key(event.app_public_key)
            if found is None:
                log.info("session %s: no SAS (no matching key)", event.session.session_id)
                return event
            own, app_raw = found
            try:
                event._secrets = agree(own, app_raw, event.session.session_id, own_role="runner")
            except ValueError:
                log.warning("session %s: the app's key is unusable", event.session.session_id)
        return event
