"""End-to-end keys and the short authentication string (SAS), pure (no I/O).

docs/protocol.md, "End-to-end keys and SAS", is the specification; this module is its
reference implementation and `tests/data/vectors/sas.json` holds its test vectors.

In short (commit, then reveal, as Bluetooth numeric comparison does): the runner sends its
X25519 public key ``x25519:<base64url>`` in `code`; the app sends in `pair` only a
commitment ``x25519-commit:<base64url(SHA-256(app_pk || N_A))>`` (optionally followed by
``;peer=<key id>`` of the runner key it answers), N_A being 32 random bytes it keeps. On
`session.opened` the runner sends 32 random bytes N_R to the app (op `message`); only
then does the app reveal app_pk and N_A (op `message`), and the runner checks them
against the commitment. Each side computes ``shared = X25519(own private, peer public)``
and::

    info        = "mqtt-pairing/sas/v2" 0x00 session_id 0x00 runner_pk app_pk N_A N_R
    okm         = HKDF-SHA256(ikm=shared, salt="", info=info, length=40)
    session_key = okm[0:32]
    s           = okm[32:40] as a big-endian unsigned 64-bit integer
    words       = the 4 words at indexes s >> 53, s >> 42 & 0x7FF, s >> 31 & 0x7FF, s >> 20 & 0x7FF
    digits      = s mod 10**6, 6 digits with leading zeros

A relay that substitutes keys must commit to the app-side key before it learns N_R, and
must give the app a nonce before it learns N_A: it gets one guess at a SAS match.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
from dataclasses import dataclass
from importlib import resources

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "COMMITMENT_PREFIX",
    "KEY_BYTES",
    "NONCE_BYTES",
    "PUBLIC_KEY_PREFIX",
    "SAS_LABEL",
    "Commitment",
    "PeerPublicKey",
    "Sas",
    "SessionSecrets",
    "commitment",
    "decode_nonce",
    "derive_session_secrets",
    "encode_commitment",
    "encode_nonce",
    "encode_public_key",
    "key_id",
    "opens",
    "parse_commitment",
    "parse_public_key",
    "sas_words",
    "transcript",
]

PUBLIC_KEY_PREFIX = "x25519:"
"""How a public key starts on the wire (the `public_key` field of `code` and `pair`)."""

COMMITMENT_PREFIX = "x25519-commit:"
"""How an app's commitment starts on the wire (the `public_key` field of `pair`)."""

PEER_HINT = ";peer="
"""Separates an app's commitment (or key) from the key id of the runner key it answers."""

NONCE_BYTES = 32
"""Length of N_A and N_R."""

KEY_BYTES = 32
"""Length of an X25519 public key, private key and shared secret (RFC 7748)."""

KEY_ID_BYTES = 16
"""Bytes of SHA-256 kept in a key id (128 bits: no second preimage can be searched for)."""

SAS_LABEL = b"mqtt-pairing/sas/v2"
"""First part of the HKDF info (the transcript); a new derivation gets a new label."""

SESSION_KEY_BYTES = 32
SAS_WORDS = 4
SAS_WORD_BITS = 11
SAS_DIGITS = 6


@functools.cache
def sas_words() -> tuple[str, ...]:
    """The 2048 words of the SAS (BIP-39 English), index order.

    Returns:
        2048 lower-case ASCII words, each unique in its first four letters.
    """
    text = resources.files("mqtt_pairing").joinpath("sas_words.txt").read_text("ascii")
    words = tuple(text.split())
    if len(words) != 1 << SAS_WORD_BITS:  # pragma: no cover - a packaging error
        raise RuntimeError("sas_words.txt must hold 2048 words")
    return words


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_B64URL = re.compile(r"[A-Za-z0-9_-]+")


def _unb64url(text: str) -> bytes:
    """Strict: the base64url alphabet only, no padding, the canonical encoding only."""
    if not _B64URL.fullmatch(text):
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not unpadded base64url") from None
    if _b64url(raw) != text:
        raise ValueError("not the canonical base64url encoding")
    return raw


def encode_public_key(raw: bytes, *, peer_key_id: str | None = None) -> str:
    """The wire form of a public key: ``x25519:<base64url, no padding>``.

    Args:
        raw: the 32-byte X25519 public key.
        peer_key_id: for an app, the key id of the runner key it answers (`key_id`);
            appended as ``;peer=<key id>``.

    Returns:
        A string of 50 characters (83 with the hint), well under the 512 allowed.

    Raises:
        ValueError: `raw` is not 32 bytes.
    """
    if len(raw) != KEY_BYTES:
        raise ValueError("an X25519 public key is 32 bytes")
    text = PUBLIC_KEY_PREFIX + _b64url(raw)
    if peer_key_id is not None:
        text += PEER_HINT + peer_key_id
    return text


@dataclass(frozen=True, slots=True)
class PeerPublicKey:
    """A public key read from the wire.

    Attributes:
        raw: the 32-byte X25519 public key.
        peer_key_id: the ``;peer=`` hint of an app's key (which runner key it answers),
            or None.
    """

    raw: bytes
    peer_key_id: str | None = None


def parse_public_key(text: str) -> PeerPublicKey:
    """Read a `public_key` field written by `encode_public_key`.

    Args:
        text: ``x25519:<base64url>`` optionally followed by ``;peer=<key id>``.

    Returns:
        The key and its hint.

    Raises:
        ValueError: another format, another algorithm, or not 32 bytes.
    """
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise ValueError("not an x25519: public key")
    body, _, hint = text[len(PUBLIC_KEY_PREFIX) :].partition(PEER_HINT)
    raw = _unb64url(body)
    if len(raw) != KEY_BYTES:
        raise ValueError("an X25519 public key is 32 bytes")
    if PEER_HINT in text and not hint:
        raise ValueError("empty peer key id")
    return PeerPublicKey(raw, hint or None)


def key_id(raw_public_key: bytes) -> str:
    """A public key's id: base64url of the first 16 bytes of its SHA-256 (22 characters).

    Used in an app's ``;peer=`` hint and in the ``key`` parameter of a pairing URI
    (docs/protocol.md, "End-to-end keys and SAS").
    """
    return _b64url(hashlib.sha256(raw_public_key).digest()[:KEY_ID_BYTES])


@dataclass(frozen=True, slots=True)
class Commitment:
    """An app's commitment read from the wire.

    Attributes:
        digest: SHA-256(app public key || N_A), 32 bytes.
        peer_key_id: the ``;peer=`` hint (which runner key it answers), or None.
    """

    digest: bytes
    peer_key_id: str | None = None


def commitment(app_public_key: bytes, app_nonce: bytes) -> bytes:
    """C_A = SHA-256(app public key (32 bytes) || N_A (32 bytes)), 32 bytes.

    Raises:
        ValueError: wrong lengths.
    """
    if len(app_public_key) != KEY_BYTES or len(app_nonce) != NONCE_BYTES:
        raise ValueError("a commitment is over a 32-byte key and a 32-byte nonce")
    return hashlib.sha256(app_public_key + app_nonce).digest()


def opens(digest: bytes, app_public_key: bytes, app_nonce: bytes) -> bool:
    """Whether a revealed key and nonce open the commitment `digest` (constant time)."""
    try:
        return hmac.compare_digest(digest, commitment(app_public_key, app_nonce))
    except ValueError:
        return False


def encode_commitment(digest: bytes, *, peer_key_id: str | None = None) -> str:
    """The app's `public_key` field in `pair`: ``x25519-commit:<base64url>[;peer=<id>]``.

    Raises:
        ValueError: `digest` is not 32 bytes.
    """
    if len(digest) != KEY_BYTES:
        raise ValueError("a commitment is 32 bytes")
    text = COMMITMENT_PREFIX + _b64url(digest)
    if peer_key_id is not None:
        text += PEER_HINT + peer_key_id
    return text


def parse_commitment(text: str) -> Commitment:
    """Read an app's commitment written by `encode_commitment`.

    Raises:
        ValueError: another format, or not 32 bytes.
    """
    if not text.startswith(COMMITMENT_PREFIX):
        raise ValueError("not an x25519-commit: commitment")
    body, _, hint = text[len(COMMITMENT_PREFIX) :].partition(PEER_HINT)
    digest = _unb64url(body)
    if len(digest) != KEY_BYTES:
        raise ValueError("a commitment is 32 bytes")
    if PEER_HINT in text and not hint:
        raise ValueError("empty peer key id")
    return Commitment(digest, hint or None)


def encode_nonce(nonce: bytes) -> str:
    """A nonce on the wire: base64url without padding (43 characters).

    Raises:
        ValueError: not 32 bytes.
    """
    if len(nonce) != NONCE_BYTES:
        raise ValueError("a nonce is 32 bytes")
    return _b64url(nonce)


def decode_nonce(text: object) -> bytes:
    """Read a nonce written by `encode_nonce` (canonical base64url, 32 bytes).

    Raises:
        ValueError: not a string, not canonical base64url, or not 32 bytes.
    """
    if not isinstance(text, str):
        raise ValueError("a nonce is a string")  # noqa: TRY004 - a wire format error
    raw = _unb64url(text)
    if len(raw) != NONCE_BYTES:
        raise ValueError("a nonce is 32 bytes")
    return raw


def transcript(
    session_id: str,
    runner_public_key: bytes,
    app_public_key: bytes,
    app_nonce: bytes,
    runner_nonce: bytes,
) -> bytes:
    """The HKDF info: label, NUL, session id (ASCII), NUL, runner key, app key, N_A, N_R.

    Raises:
        ValueError: a key or nonce is not 32 bytes, or the session id is not 1-64
            printable ASCII.
    """
    if len(runner_public_key) != KEY_BYTES or len(app_public_key) != KEY_BYTES:
        raise ValueError("X25519 public keys are 32 bytes")
    if len(app_nonce) != NONCE_BYTES or len(runner_nonce) != NONCE_BYTES:
        raise ValueError("nonces are 32 bytes")
    if not 1 <= len(session_id) <= 64 or not all("!" <= c <= "~" for c in session_id):
        raise ValueError("a session id is 1-64 printable ASCII characters")
    return b"".join(
        (
            SAS_LABEL,
            b"\0",
            session_id.encode("ascii"),
            b"\0",
            runner_public_key,
            app_public_key,
            app_nonce,
            runner_nonce,
        )
    )


@dataclass(frozen=True, slots=True)
class Sas:
    """A short authentication string, as words and as digits (the same 64 bits).

    Attributes:
        words: 4 words of the BIP-39 English list (44 bits).
        digits: 6 decimal digits (about 20 bits), for displays without letters.
    """

    words: tuple[str, ...]
    digits: str

    def __str__(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True, slots=True)
class SessionSecrets:
    """What both ends of a session derive; never sent anywhere.

    Attributes:
        session_key: 32 bytes for the application's own end-to-end use (e.g. an AEAD key);
            the service never learns it.
        sas: what the two people compare.
    """

    session_key: bytes
    sas: Sas


def derive_session_secrets(
    shared_secret: bytes,
    session_id: str,
    runner_public_key: bytes,
    app_public_key: bytes,
    app_nonce: bytes,
    runner_nonce: bytes,
) -> SessionSecrets:
    """Derive the session key and the SAS (docs/protocol.md, "End-to-end keys and SAS").

    Args:
        shared_secret: X25519(own private key, peer public key), 32 bytes.
        session_id: the `session_id` of the session that opened.
        runner_public_key: the runner's raw public key (32 bytes), whoever computes.
        app_public_key: the app's raw public key (32 bytes), as revealed.
        app_nonce: N_A (32 bytes), as revealed.
        runner_nonce: N_R (32 bytes), sent by the runner after it saw the commitment.

    Returns:
        The session key and the SAS.

    Raises:
        ValueError: wrong lengths, or a session id that is not printable ASCII.
    """
    if len(shared_secret) != KEY_BYTES:
        raise ValueError("an X25519 shared secret is 32 bytes")
    info = transcript(session_id, runner_public_key, app_public_key, app_nonce, runner_nonce)
    okm = HKDF(algorithm=hashes.SHA256(), length=40, salt=None, info=info).derive(shared_secret)
    value = int.from_bytes(okm[SESSION_KEY_BYTES:], "big")
    words = sas_words()
    mask = (1 << SAS_WORD_BITS) - 1
    picked = tuple(
        words[(value >> (64 - SAS_WORD_BITS * (i + 1))) & mask] for i in range(SAS_WORDS)
    )
    digits = f"{value % 10**SAS_DIGITS:0{SAS_DIGITS}d}"
    return SessionSecrets(okm[:SESSION_KEY_BYTES], Sas(picked, digits))
