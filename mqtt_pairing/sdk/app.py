"""AppClient: pairs with codes or pairing URIs, lists and closes its sessions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sas import SessionSecrets, key_id, parse_public_key
from mqtt_pairing.sdk.e2e import KeyPair, agree
from mqtt_pairing.sdk.errors import KeyMismatch
from mqtt_pairing.sdk.peer import Peer
from mqtt_pairing.sdk.wire import (
    PairResult,
    Session,
    SessionOpened,
    SessionsResult,
    StatusResult,
    UnpairResult,
)
from mqtt_pairing.topics import Kind

__all__ = ["AppClient", "PairingUri"]

_KEEP_SECRETS = 64


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
        **options: `Peer` options (prefix, protocol, session_expiry_s, ...).
    """

    kind = Kind.APP

    def __init__(
        self,
        ident: str,
        address: BrokerAddress,
        *,
        name: str | None = None,
        **options: Any,  # noqa: ANN401
    ) -> None:
        self.name = name
        self._secrets: dict[str, SessionSecrets] = {}
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

        Args:
            code: the code as the person typed it (the service normalises it).
            app_name: shown to the runner (default the client's `name`).
            metadata: a JSON object of at most 1024 bytes relayed to the runner.
            e2e: send a public key; the result's `sas` is then set when the runner sent
                one too.
            runner_key_id: the key id the pairing URI named; a runner key that does not
                match closes the session and raises `KeyMismatch`.
            request_id: to repeat a request exactly (default a new UUID).
            timeout_s: request timeout, seconds.

        Returns:
            The session, the runner's key and metadata, and `sas` / `session_key`.

        Raises:
            ReplyError: e.g. CODE_NOT_FOUND, RATE_LIMITED (see `retry_after_s`).
            KeyMismatch: the runner's key is not the one `runner_key_id` names.
            NoReply: no reply in time.
        """
        own = KeyPair.generate() if e2e else None
        fields: dict[str, Any] = {"code": code}
        if request_id is not None:
            fields["request_id"] = request_id
        if (app_name or self.name) is not None:
            fields["app_name"] = app_name or self.name
        if metadata is not None:
            fields["metadata"] = metadata
        if own is not None:
            fields["public_key"] = own.wire(peer_key_id=runner_key_id)
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
        if own is not None and runner_raw is not None:
            try:
                secrets = agree(own, runner_raw, session_id, own_role="app")
            except ValueError:
                secrets = None
            if secrets is not None:
                result._secrets = secrets
                self._secrets[session_id] = secrets
                while len(self._secrets) > _KEEP_SECRETS:
                    self._secrets.pop(next(iter(self._secrets)))
        return result

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
        # has read its reply and derived the secrets.
        if isinstance(event, SessionOpened) and event.sas is None:
            event._secrets = self._secrets.get(event.session.session_id)
        return event


def _raw_key(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return parse_public_key(text).raw
    except ValueError:
        return None
