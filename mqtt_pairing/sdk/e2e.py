"""End-to-end key pairs for pairings (X25519, the `cryptography` package).

A runner makes a key pair for each code it asks for and an app one for each `pair`; only
the public key ever leaves the process. `agree` computes the shared secret with the peer's
public key and derives the session key and the SAS (`mqtt_pairing.sas`, docs/protocol.md,
"End-to-end keys and SAS").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from mqtt_pairing.sas import (
    SessionSecrets,
    derive_session_secrets,
    encode_public_key,
    key_id,
    parse_public_key,
)

__all__ = ["KeyPair", "RunnerKeyRing", "agree"]

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
        """The `public_key` field: ``x25519:<base64url>`` (``;peer=<id>`` for an app)."""
        return encode_public_key(self.public, peer_key_id=peer_key_id)


def agree(
    own: KeyPair, peer_public_key: bytes, session_id: str, *, own_role: str
) -> SessionSecrets:
    """The session key and SAS of a session, from one side.

    Args:
        own: this side's key pair.
        peer_public_key: the other side's raw public key (32 bytes).
        session_id: the session that opened.
        own_role: "runner" or "app" (which key comes first in the transcript).

    Returns:
        The same `SessionSecrets` the other side derives, unless a key was swapped.

    Raises:
        ValueError: a malformed or low-order peer key (the shared secret would be zero).
    """
    shared = own.private.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    if own_role == "runner":
        return derive_session_secrets(shared, session_id, own.public, peer_public_key)
    return derive_session_secrets(shared, session_id, peer_public_key, own.public)


class RunnerKeyRing:
    """A runner's recent key pairs, one per code, found again by key id.

    An app's key names the runner key it answers (``;peer=``), so a `session.opened` that
    arrives after the runner asked for a newer code (or after a reconnect) still finds
    its key. The newest 32 are kept.
    """

    def __init__(self) -> None:
        self._keys: OrderedDict[str, KeyPair] = OrderedDict()

    def new(self) -> KeyPair:
        """Make, keep and return a key pair for the next code."""
        pair = KeyPair.generate()
        self._keys[pair.key_id] = pair
        while len(self._keys) > _RING_SIZE:
            self._keys.popitem(last=False)
        return pair

    def add(self, pair: KeyPair) -> None:
        """Keep a key pair made elsewhere (for example restored by the caller)."""
        self._keys[pair.key_id] = pair

    def for_app_key(self, app_public_key: str) -> tuple[KeyPair, bytes] | None:
        """The runner key an app's `public_key` answers, and the app's raw key.

        Args:
            app_public_key: the app's `public_key` field from `session.opened`.

        Returns:
            (runner key pair, app raw key); the newest key when the app named none; None
            when the field is not ours or names a key this runner no longer has.
        """
        try:
            parsed = parse_public_key(app_public_key)
        except ValueError:
            return None
        if parsed.peer_key_id is not None:
            pair = self._keys.get(parsed.peer_key_id)
        else:
            pair = next(reversed(self._keys.values()), None)
        return None if pair is None else (pair, parsed.raw)
