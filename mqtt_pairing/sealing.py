"""Keys derived from `PAIRING_SECRET`, and sealing of remembered replies that hold a code.

docs/protocol.md: a remembered `code` reply is stored sealed with a key derived from
`PAIRING_SECRET`, never in the clear. Sealing is AES-256-GCM (the `cryptography`
package) with a random 96-bit nonce; the sealed form is `v1.` + urlsafe base64 of
nonce || ciphertext || tag.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

_PREFIX = "v1."
_NONCE_BYTES = 12


def derive_key(secret: bytes, label: str) -> bytes:
    """A 32-byte subkey of `secret` for one purpose (HMAC-SHA256 of the label)."""
    return hmac.new(secret, b"mqtt-pairing/" + label.encode(), hashlib.sha256).digest()


class Sealer:
    """Seals and opens short strings with a key derived from the pairing secret."""

    def __init__(self, secret: bytes) -> None:
        self._aead = AESGCM(derive_key(secret, "seal/v1"))

    def seal(self, plaintext: str, *, context: str = "") -> str:
        """Encrypt and authenticate `plaintext`, bound to `context` (e.g. the key name)."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, sealed: str, *, context: str = "") -> str:
        """Decrypt what `seal` made with the same context.

        Raises:
            ValueError: the text was not sealed with this secret and context.
        """
        if not sealed.startswith(_PREFIX):
            raise ValueError("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_PREFIX) :])
            nonce, body = raw[:_NONCE_BYTES], raw[_NONCE_BYTES:]
            return self._aead.decrypt(nonce, body, context.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise ValueError("cannot open the sealed value") from exc
