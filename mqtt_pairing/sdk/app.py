"""AppClient: pairs with codes or pairing URIs, lists and closes its sessions.

End-to-end (docs/protocol.md, "End-to-end keys and SAS"): `pair` sends a commitment to a
fresh key and nonce, then waits (at most `e2e_timeout_s`) for the runner's nonce, reveals
its key and nonce, and returns the SAS. A nonce that comes later is still answered (the
runner then shows its SAS; `sas_for` gives the app's).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sas import Sas, SessionSecrets, key_id, parse_public_key
from mqtt_pairing.sdk.e2e import KeyPair, agree, new_nonce, read_nonce, reveal_data
from mqtt_pairing.sdk.errors import E2eFailed, KeyMismatch
from mqtt_pairing.sdk.peer import Peer
from mqtt_pairing.sdk.wire import (
    E2eState,
    PairResult,
    Session,
    SessionMessage,
    SessionOpened,
    SessionsResult,
    StatusResult,
    UnpairResult,
)
from mqtt_pairing.topics import Kind

__all__ = ["AppClient", "PairingUri"]

log = logging.getLogger(__name__)

_KEEP = 64
"""Sessions whose exchange state (and nonces that came early) an app remembers."""


@dataclass
class _Exchange:
    """An app's side of one session's exchange: committed, waiting for the nonce."""

    own: KeyPair
    app_nonce: bytes = field(repr=False)
    runner_key: bytes
    state: E2eState = "pending"
    answered: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class PairingUri:
    """A parsed `mqtt-pairing://pair?code=...&runner=...[&key=...]` (docs/protocol.md).

    Attributes:
        code: the code as in the URI (9 characters, no dashes).
        runner_id: the runner it belongs to, or None if absent.
        key_id: the runner key id the runner's SDK appended, or None.
    """

    code: str
    runner_id: str | None
    key_id: str | None

    @classmethod
    def parse(cls, uri: str) -> PairingUri:
        """Parse a pairing URI.

        Raises:
            ValueError: not an `mqtt-pairing://pair` URI with one `code`.
        """
        parts = urlsplit(uri.strip())
        query = parse_qs(parts.query)
        codes = query.get("code", [])
        if parts.scheme != "mqtt-pairing" or parts.netloc != "pair" or len(codes) != 1:
            raise ValueError("not an mqtt-pairing://pair?code=... URI")
        runner = query.get("runner", [None])[0]
        key = query.get("key", [None])[0]
        return cls(codes[0], runner, key)


class AppClient(Peer):
    """An app (docs/sdk.md, "Apps").

    Args:
        ident: the app id (also its MQTT username on the shipped broker config).
        address: the broker (`ws://host:8083/mqtt` for the WebSockets listener).
        name: `app_name` sent with each `pair` unless a call gives another.
        require_e2e: `pair` raises `E2eFailed` (after closing the session) instead of
            returning an unverified pairing when the end-to-end exchange does not complete.
        e2e_timeout_s: how long `pair` waits for the runner's nonce, seconds.
        **options: `Peer` options (prefix, protocol, session_expiry_s, ...).
    """

    kind = Kind.APP

    def __init__(
        self,
        ident: str,
        address: BrokerAddress,
        *,
        name: str | None = None,
        require_e2e: bool = False,
        e2e_timeout_s: float = 10.0,
        **options: Any,  # noqa: ANN401
    ) -> None:
        self.name = name
        self.require_e2e = require_e2e
        self.e2e_timeout_s = e2e_timeout_s
        self._secrets: dict[str, SessionSecrets] = {}
        self._exchanges: dict[str, _Exchange] = {}
        self._early: dict[str, bytes] = {}
        super().__init__(ident, address, **options)

    async def pair(
        self,
        code: str,
        *,
        app_name: str | None = None,
        metadata: dict[str, Any] | None = None,
        e2e: bool = True,
        runner_key_id: str | None = None,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> PairResult:
        """Pair with a runner's code (`pair`, docs/protocol.md "App pair").

        With `e2e`, the end-to-end exchange follows (docs/protocol.md, "End-to-end keys and
        SAS"): this waits up to `e2e_timeout_s` for the runner's nonce.

        Args:
            code: the code as the person typed it (the service normalises it).
            app_name: shown to the runner (default the client's `name`).
            metadata: a JSON object of at most 1024 bytes relayed to the runner.
            e2e: take part in the end-to-end exchange; the result's `sas` is then set when
                the runner takes part too (`e2e` says where it stands).
            runner_key_id: the key id the pairing URI named; a runner key that does not
                match closes the session and raises `KeyMismatch`.
            request_id: to repeat a request exactly (default a new UUID).
            timeout_s: request timeout, seconds.

        Returns:
            The session, the runner's key and metadata, and `sas` / `session_key` / `e2e`.

        Raises:
            ReplyError: e.g. CODE_NOT_FOUND, RATE_LIMITED (see `retry_after_s`).
            KeyMismatch: the runner's key is not the one `runner_key_id` names.
            E2eFailed: with `require_e2e`, the exchange did not complete (session closed).
            NoReply: no reply in time.
        """
        if self.require_e2e and not e2e:
            raise ValueError("require_e2e needs e2e")
        own = KeyPair.generate() if e2e else None
        app_nonce = new_nonce()
        fields: dict[str, Any] = {"code": code}
        if request_id is not None:
            fields["request_id"] = request_id
        if (app_name or self.name) is not None:
            fields["app_name"] = app_name or self.name
        if metadata is not None:
            fields["metadata"] = metadata
        if own is not None:
            fields["public_key"] = own.commit(app_nonce, peer_key_id=runner_key_id)
        result = PairResult.model_validate(await self.call("pair", fields, timeout_s=timeout_s))
        session_id = result.session.session_id
        runner_raw = _raw_key(result.runner_public_key)
        if runner_key_id is not None and (
            runner_raw is None or key_id(runner_raw) != runner_key_id
        ):
            await self.unpair(session_id)
            raise KeyMismatch(
                f"session {session_id}: the runner's key is not the one its URI named"
            )
        if own is None:
            return result
        if runner_raw is None:
            if self.require_e2e:
                await self.unpair(session_id)
                raise E2eFailed(session_id, "the runner sent no key")
            return result
        exchange = _Exchange(own, app_nonce, runner_raw)
        self._exchanges[session_id] = exchange
        _trim(self._exchanges)
        early = self._early.pop(session_id, None)
        if early is not None:
            self._answer(session_id, exchange, early)
        try:
            await asyncio.wait_for(exchange.done.wait(), self.e2e_timeout_s)
        except TimeoutError:
            log.info("session %s: no nonce from the runner in time", session_id)
        result._secrets = self._secrets.get(session_id)
        result._e2e = "none" if exchange.state == "pending" else exchange.state
        if result._secrets is None and self.require_e2e:
            self._exchanges.pop(session_id, None)
            if exchange.state != "failed":  # a failed exchange closed its session already
                await self.unpair(session_id)
            raise E2eFailed(session_id, "no end-to-end exchange with the runner")
        return result

    def sas_for(self, session_id: str) -> Sas | None:
        """The SAS of one of the recent sessions of this client, once its exchange is done.

        For a runner that answered after `pair` returned (it was offline, or slow).
        """
        secrets = self._secrets.get(session_id)
        return None if secrets is None else secrets.sas

    async def pair_uri(self, uri: str, **options: Any) -> PairResult:  # noqa: ANN401
        """Pair from a `pairing_uri` (a link or QR code), checking the runner's key id.

        Raises:
            ValueError: not a pairing URI.
            KeyMismatch: the runner's key differs from the URI's `key` (session closed).
            ReplyError: an error reply. NoReply: no reply in time.
        """
        parsed = PairingUri.parse(uri)
        return await self.pair(parsed.code, runner_key_id=parsed.key_id, **options)

    async def sessions(self, *, timeout_s: float | None = None) -> list[Session]:
        """The app's active sessions (`sessions`).

        Raises:
            ReplyError: an error reply. NoReply: no reply in time.
        """
        raw = await self.call("sessions", timeout_s=timeout_s)
        return SessionsResult.model_validate(raw).sessions

    async def unpair(self, session_id: str, *, timeout_s: float | None = None) -> int:
        """Close one of the app's sessions (`unpair`); returns 1.

        Raises:
            ReplyError: SESSION_NOT_FOUND if it is not the app's. NoReply: no reply.
        """
        raw = await self.call("unpair", {"session_id": session_id}, timeout_s=timeout_s)
        return UnpairResult.model_validate(raw).closed

    async def status(self, *, timeout_s: float | None = None) -> StatusResult:
        """Paired runners and whether they are online (`status`).

        Raises:
            ReplyError: an error reply. NoReply: no reply in time.
        """
        return StatusResult.model_validate(await self.call("status", timeout_s=timeout_s))

    def _deliver(self, event: Any) -> Any:  # noqa: ANN401
        # Attached when taken, not when received: the event may come in before `pair`
        # has finished the exchange.
        if isinstance(event, SessionOpened) and event.sas is None:
            event._secrets = self._secrets.get(event.session.session_id)
            exchange = self._exchanges.get(event.session.session_id)
            if exchange is not None:
                event._e2e = exchange.state
        return event

    def _parse_event(self, body: dict[str, Any]) -> Any:  # noqa: ANN401
        event = super()._parse_event(body)
        if isinstance(event, SessionMessage) and str(event.data.get("type", "")).startswith("sas."):
            if event.from_ == "runner":
                self._nonce(event)
            return None
        return event

    def _nonce(self, message: SessionMessage) -> None:
        try:
            runner_nonce = read_nonce(message.data)
        except ValueError:
            return
        exchange = self._exchanges.get(message.session_id)
        if exchange is None:
            # Before `pair` has read its reply: kept for it (a few, the first of each).
            self._early.setdefault(message.session_id, runner_nonce)
            _trim(self._early)
            return
        self._answer(message.session_id, exchange, runner_nonce)

    def _answer(self, session_id: str, exchange: _Exchange, runner_nonce: bytes) -> None:
        if exchange.answered:
            return  # only the first nonce of a session is answered
        exchange.answered = True
        try:
            secrets = agree(
                exchange.own,
                exchange.runner_key,
                session_id,
                own_role="app",
                app_nonce=exchange.app_nonce,
                runner_nonce=runner_nonce,
            )
        except ValueError:
            # A low-order or malformed runner key: tampering; the session is closed.
            log.warning("session %s: the runner's key is unusable: closing it", session_id)
            exchange.state = "failed"
            self._spawn(self._close_failed(session_id, exchange))
            return
        self._spawn(self._reveal(session_id, exchange, secrets))

    async def _close_failed(self, session_id: str, exchange: _Exchange) -> None:
        try:
            await self.unpair(session_id)
        except Exception as exc:
            log.warning("session %s: could not close it: %s", session_id, exc)
        finally:
            exchange.done.set()

    async def _reveal(self, session_id: str, exchange: _Exchange, secrets: SessionSecrets) -> None:
        try:
            await self.message(session_id, reveal_data(exchange.own, exchange.app_nonce))
        except Exception as exc:
            log.info("session %s: reveal not sent (%s)", session_id, type(exc).__name__)
            exchange.state = "none"
        else:
            self._secrets[session_id] = secrets
            _trim(self._secrets)
            exchange.state = "ready"
        finally:
            exchange.done.set()


def _trim(kept: dict[str, Any]) -> None:
    while len(kept) > _KEEP:
        kept.pop(next(iter(kept)))


def _raw_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return parse_public_key(text).raw
    except ValueError:
        return None
