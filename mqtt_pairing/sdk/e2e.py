"""End-to-end key pairs for pairings (X25519, the `cryptography` package).

A runner makes a key pair for each code it asks for and an app one for each `pair`; only
the public key (the app: first a commitment to it) ever leaves the process. `agree`
computes the shared secret with the peer's public key and derives the session key and the
SAS (`mqtt_pairing.sas`, docs/protocol.md, "End-to-end keys and SAS"). The two messages of
the exchange, relayed by the `message` op as `session.message` events, are built and read
here: the runner's nonce (`nonce_data`) and the app's reveal (`reveal_data`).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mqtt_pairing.sas import (
    NONCE_BYTES,
    SessionSecrets,
    commitment,
    decode_nonce,
    derive_session_secrets,
    encode_commitment,
    encode_nonce,
    encode_public_key,
    key_id,
    parse_commitment,
    parse_public_key,
)

__all__ = [
    "NONCE_TYPE",
    "REVEAL_TYPE",
    "Claim",
    "KeyPair",
    "RunnerKeyRing",
    "agree",
    "new_nonce",
    "nonce_data",
    "read_nonce",
    "read_reveal",
    "reveal_data",
]

NONCE_TYPE = "sas.nonce"
"""`type` of the runner's message carrying N_R."""
REVEAL_TYPE = "sas.reveal"
"""`type` of the app's message revealing its public key and N_A."""

_RING_SIZE = 32


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair for one pairing.

    Attributes:
        private: the private key (never sent, never logged).
        public: the raw 32-byte public key.
    """

    private: X25519PrivateKey = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair from the operating system's CSPRNG."""
        private = X25519PrivateKey.generate()
        return cls(private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> KeyPair:
        """A key pair from a 32-byte private key (test vectors, or a key kept by the caller).

        Raises:
            ValueError: `raw` is not 32 bytes.
        """
        private = X25519PrivateKey.from_private_bytes(raw)
        return cls(private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    @property
    def key_id(self) -> str:
        """`mqtt_pairing.sas.key_id` of the public key."""
        return key_id(self.public)

    def wire(self, *, peer_key_id: str | None = None) -> str:
        """The public key on the wire: ``x25519:<base64url>``."""
        return encode_public_key(self.public, peer_key_id=peer_key_id)

    def commit(self, nonce: bytes, *, peer_key_id: str | None = None) -> str:
        """The app's `public_key` field of `pair`: ``x25519-commit:<base64url>[;peer=]``.

        Args:
            nonce: N_A, 32 bytes from `new_nonce`.
            peer_key_id: the key id of the runner key the app answers, if known.
        """
        return encode_commitment(commitment(self.public, nonce), peer_key_id=peer_key_id)


def new_nonce() -> bytes:
    """32 bytes from the operating system's CSPRNG (N_A or N_R)."""
    return secrets.token_bytes(NONCE_BYTES)


def nonce_data(runner_nonce: bytes) -> dict[str, Any]:
    """The `data` of the runner's `message`: ``{"type": "sas.nonce", "nonce"}``."""
    return {"type": NONCE_TYPE, "nonce": encode_nonce(runner_nonce)}


def reveal_data(own: KeyPair, app_nonce: bytes) -> dict[str, Any]:
    """The `data` of the app's `message`: ``{"type": "sas.reveal", "public_key", "nonce"}``."""
    return {"type": REVEAL_TYPE, "public_key": own.wire(), "nonce": encode_nonce(app_nonce)}


def read_nonce(data: dict[str, Any]) -> bytes:
    """N_R from a `sas.nonce` message.

    Raises:
        ValueError: not a well-formed `sas.nonce`.
    """
    if data.get("type") != NONCE_TYPE:
        raise ValueError("not a sas.nonce message")
    return decode_nonce(data.get("nonce"))


def read_reveal(data: dict[str, Any]) -> tuple[bytes, bytes]:
    """(app raw public key, N_A) from a `sas.reveal` message.

    Raises:
        ValueError: not a well-formed `sas.reveal`.
    """
    if data.get("type") != REVEAL_TYPE:
        raise ValueError("not a sas.reveal message")
    key = data.get("public_key")
    if not isinstance(key, str):
        raise ValueError("public_key is a string")  # noqa: TRY004 - a wire format error
    parsed = parse_public_key(key)
    if parsed.peer_key_id is not None:
        raise ValueError("a revealed key carries no hint")
    return parsed.raw, decode_nonce(data.get("nonce"))


def agree(
    own: KeyPair,
    peer_public_key: bytes,
    session_id: str,
    *,
    own_role: str,
    app_nonce: bytes,
    runner_nonce: bytes,
) -> SessionSecrets:
    """The session key and SAS of a session, from one side.

    Args:
        own: this side's key pair.
        peer_public_key: the other side's raw public key (32 bytes; the app's as revealed).
        session_id: the session that opened.
        own_role: "runner" or "app" (which key comes first in the transcript).
        app_nonce: N_A (32 bytes).
        runner_nonce: N_R (32 bytes).

    Returns:
        The same `SessionSecrets` the other side derives, unless a key was swapped.

    Raises:
        ValueError: a malformed or low-order peer key (the shared secret would be zero).
    """
    shared = own.private.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    if own_role == "runner":
        runner, app = own.public, peer_public_key
    else:
        runner, app = peer_public_key, own.public
    return derive_session_secrets(shared, session_id, runner, app, app_nonce, runner_nonce)


Claim = Literal["new", "again", "spent"]
"""`RunnerKeyRing.claim`: a new exchange, a session already counted, or a retired key."""


class RunnerKeyRing:
    """A runner's recent key pairs, one per code, found again by key id.

    An app's commitment names the runner key it answers (``;peer=``), so a `session.opened` that
    arrives after the runner asked for a newer code (or after a reconnect) still finds
    its key. The newest 32 are kept.

    Each key allows as many exchanges as its code allows pairings (`max_uses`, see
    `allow`); then it is retired (docs/protocol.md, "End-to-end keys and SAS": each N_R
    the runner sends is one guess for a relay in the middle, so one per use of the code).
    """

    def __init__(self) -> None:
        self._keys: OrderedDict[str, KeyPair] = OrderedDict()
        self._uses: dict[str, int] = {}
        self._sessions: dict[str, set[str]] = {}

    def new(self, uses: int = 1) -> KeyPair:
        """Make, keep and return a key pair for the next code (`uses` exchanges, >= 0)."""
        pair = KeyPair.generate()
        self.add(pair, uses)
        return pair

    def add(self, pair: KeyPair, uses: int = 1) -> None:
        """Keep a key pair made elsewhere (for example restored by the caller).

        Args:
            pair: the key pair.
            uses: how many exchanges it may run (the `max_uses` of its code).
        """
        self._keys[pair.key_id] = pair
        self._uses[pair.key_id] = uses
        self._sessions.setdefault(pair.key_id, set())
        while len(self._keys) > _RING_SIZE:
            gone, _ = self._keys.popitem(last=False)
            self._uses.pop(gone, None)
            self._sessions.pop(gone, None)

    def allow(self, key_id: str, uses: int) -> None:
        """Set how many exchanges the key may run in all (its code's `max_uses`)."""
        if key_id in self._keys:
            self._uses[key_id] = uses

    def claim(self, key_id: str, session_id: str) -> Claim:
        """Count an exchange of `session_id` with the key.

        Returns:
            "new": a use granted (send a nonce); "again": this session was already
            counted (a duplicate `session.opened`: start nothing); "spent": the key ran
            out of uses (or is unknown) and is retired: treat the pairing as tampered with.
        """
        sessions = self._sessions.get(key_id)
        if sessions is None:
            return "spent"
        if session_id in sessions:
            return "again"
        if len(sessions) >= self._uses.get(key_id, 0):
            return "spent"
        sessions.add(session_id)
        return "new"

    def for_commitment(self, app_field: str) -> tuple[KeyPair, bytes] | None:
        """The runner key an app's commitment answers, and the commitment's digest.

        Args:
            app_field: the app's `public_key` field from `session.opened`.

        Returns:
            (runner key pair, 32-byte commitment); the newest key when the app named none;
            None when the field is not a commitment or names a key this runner no longer
            has.
        """
        try:
            parsed = parse_commitment(app_field)
        except ValueError:
            return None
        if parsed.peer_key_id is not None:
            pair = self._keys.get(parsed.peer_key_id)
        else:
            pair = next(reversed(self._keys.values()), None)
        return None if pair is None else (pair, parsed.digest)
