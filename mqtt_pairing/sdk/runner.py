"""RunnerClient: asks for codes, hears of pairings, announces its presence.

Presence (docs/protocol.md, "Presence"): on every connection the runner publishes a
retained `{"state": "online"}` on its status topic; its Last Will is a retained
`{"state": "offline"}`, sent by the broker when the connection dies (with MQTT 5 and
`will_delay_s`, only if the runner has not come back by then); `close` publishes `offline` itself.
Optional heartbeats keep it online for the service where statuses are not used.

End-to-end (docs/protocol.md, "End-to-end keys and SAS"): a `session.opened` whose app
key is a commitment is held back (with the events after it) while the runner sends its
nonce and waits for the app's reveal, at most `e2e_timeout_s`; it is then handed out with
`sas` set (`e2e == "ready"`), or without (`"failed"`: the reveal did not open the
commitment, no reveal came after the nonce went out, or the code's key had already run
as many exchanges as the code has uses; the SDK closed the session). A second
`session.opened` for a session already counted starts nothing and is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sas import SessionSecrets, opens
from mqtt_pairing.sdk.connection import reap
from mqtt_pairing.sdk.e2e import (
    REVEAL_TYPE,
    KeyPair,
    RunnerKeyRing,
    agree,
    new_nonce,
    nonce_data,
    read_reveal,
)
from mqtt_pairing.sdk.peer import Peer, _Slot
from mqtt_pairing.sdk.wire import (
    CancelCodeResult,
    CodeResult,
    E2eState,
    Session,
    SessionClosed,
    SessionMessage,
    SessionOpened,
    SessionsResult,
    UnpairResult,
)
from mqtt_pairing.topics import Kind

__all__ = ["RunnerClient"]

log = logging.getLogger(__name__)

_ONLINE = json.dumps({"state": "online"}).encode()
_OFFLINE = json.dumps({"state": "offline"}).encode()


@dataclass
class _Exchange:
    """A runner's side of one session's exchange, from `session.opened` to the reveal."""

    event: SessionOpened
    slot: _Slot
    own: KeyPair
    commitment: bytes
    runner_nonce: bytes = field(repr=False)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False


class RunnerClient(Peer):
    """A runner (docs/sdk.md, "Runners").

    Args:
        ident: the runner id (also its MQTT username on the shipped broker config).
        address: the broker.
        name: `runner_name` sent with each code unless a call gives another.
        presence: announce `online` / `offline` on the status topic, with a Last Will.
        will_delay_s: MQTT 5 Will Delay Interval, seconds: a connection lost for less
            than this never shows the runner offline, and apps may still pair meanwhile
            (ignored on MQTT 3.1.1). 0: offline as soon as the broker sees the loss.
        heartbeat_s: send a `heartbeat` this often, seconds; None for none.
        require_e2e: close (unpair) every session whose app does not complete the
            end-to-end exchange; its `session.opened` is handed out with `e2e == "failed"`.
        e2e_timeout_s: how long to wait for the app's reveal, seconds; no reveal by then
            (after the nonce went out) is tampering: `e2e == "failed"`, session closed.
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
        will_delay_s: int = 0,
        heartbeat_s: float | None = None,
        require_e2e: bool = False,
        e2e_timeout_s: float = 10.0,
        **options: Any,  # noqa: ANN401
    ) -> None:
        self.name = name
        self.require_e2e = require_e2e
        self.e2e_timeout_s = e2e_timeout_s
        self._exchanges: dict[str, _Exchange] = {}
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
            await reap(self._heartbeats)

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
        pair = self.keys.new(uses=max_uses or 1) if e2e else None
        if pair is not None:
            fields["public_key"] = pair.wire()
        result = CodeResult.model_validate(await self.call("code", fields, timeout_s=timeout_s))
        if pair is None:
            return result
        # One exchange (one N_R, one guess for a relay in the middle) per use of the code.
        self.keys.allow(pair.key_id, result.max_uses)
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

    # -- end-to-end exchange -------------------------------------------------------

    def _parse_event(self, body: dict[str, Any]) -> Any:  # noqa: ANN401
        event = super()._parse_event(body)
        if isinstance(event, SessionOpened):
            return self._opened(event)
        if isinstance(event, SessionMessage) and str(event.data.get("type", "")).startswith("sas."):
            self._sas_message(event)
            return None
        if isinstance(event, SessionClosed):
            exchange = self._exchanges.get(event.session.session_id)
            if exchange is not None:
                self._finish(exchange, "none", None, close=False)
        return event

    def _opened(self, event: SessionOpened) -> SessionOpened | None:
        session_id = event.session.session_id
        found = None
        if event.app_public_key is not None:
            found = self.keys.for_commitment(event.app_public_key)
        if found is None:
            log.info("session %s: no end-to-end exchange (no commitment to our key)", session_id)
            if not self.require_e2e:
                return event
            slot = self._emit(event, ready=False)
            self._spawn(self._close_unverified(event, slot))
            return None
        own, digest = found
        claim = self.keys.claim(own.key_id, session_id)
        if claim == "again":
            log.warning(
                "session %s: session.opened again for the same session: dropped", session_id
            )
            return None
        if claim == "spent":
            log.warning(
                "session %s: the code's key has run all its exchanges: tampering", session_id
            )
            self._spawn(self._close_unverified(event, self._emit(event, ready=False)))
            return None
        exchange = _Exchange(event, self._emit(event, ready=False), own, digest, new_nonce())
        event._e2e = "pending"
        self._exchanges[session_id] = exchange
        self._spawn(self._run_exchange(exchange))
        return None

    async def _close_unverified(self, event: SessionOpened, slot: _Slot) -> None:
        event._e2e = "failed"
        try:
            await self.unpair(session_id=event.session.session_id)
        except Exception as exc:
            log.warning("session %s: could not close it: %s", event.session.session_id, exc)
        finally:
            self._release(slot)

    async def _run_exchange(self, exchange: _Exchange) -> None:
        session_id = exchange.event.session.session_id
        try:
            # The whole exchange, sending the nonce included, within e2e_timeout_s: the
            # events held behind session.opened wait no longer.
            async with asyncio.timeout(self.e2e_timeout_s):
                await self.message(
                    session_id, nonce_data(exchange.runner_nonce), timeout_s=self.e2e_timeout_s
                )
                await exchange.done.wait()
        except Exception as exc:
            # N_R went out (or may have): a commitment never revealed is tampering too.
            log.warning(
                "session %s: no reveal after the nonce (%s)", session_id, type(exc).__name__
            )
            self._finish(exchange, "failed", None)

    def _sas_message(self, message: SessionMessage) -> None:
        exchange = self._exchanges.get(message.session_id)
        if exchange is None or message.from_ != "app" or message.data.get("type") != REVEAL_TYPE:
            return  # not ours, or not now: only the first reveal of a session counts
        try:
            app_raw, app_nonce = read_reveal(message.data)
        except ValueError:
            self._finish(exchange, "failed", None)
            return
        if not opens(exchange.commitment, app_raw, app_nonce):
            log.warning(
                "session %s: the app's reveal does not open its commitment", message.session_id
            )
            self._finish(exchange, "failed", None)
            return
        try:
            secrets = agree(
                exchange.own,
                app_raw,
                message.session_id,
                own_role="runner",
                app_nonce=app_nonce,
                runner_nonce=exchange.runner_nonce,
            )
        except ValueError:
            self._finish(exchange, "failed", None)
            return
        self._finish(exchange, "ready", secrets)

    def _finish(
        self,
        exchange: _Exchange,
        state: E2eState,
        secrets: SessionSecrets | None,
        *,
        close: bool = True,
    ) -> None:
        """End an exchange: the event goes out with its SAS, or closed and without."""
        event = exchange.event
        if exchange.finished:
            return
        exchange.finished = True
        if self._exchanges.get(event.session.session_id) is exchange:
            del self._exchanges[event.session.session_id]
        exchange.done.set()
        event._secrets = secrets
        if secrets is not None:
            self._release(exchange.slot)
            return
        if close and (state == "failed" or self.require_e2e):
            self._spawn(self._close_unverified(event, exchange.slot))
            return
        event._e2e = state
        self._release(exchange.slot)
