"""Pairing codes: generation, normalisation, digests and safe display (pure, no I/O).

A code is 9 characters of Crockford base32 (45 bits), shown as ``ABC-DEF-GHJ``
(docs/protocol.md, "Codes"). The store never keeps a code in the clear: it is looked up by
`code_digest` (an HMAC keyed with a secret derived from ``PAIRING_SECRET``), and shown to
operators only as `mask_code` (its first character and a fingerprint of the digest).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import unicodedata
from collections.abc import Callable
from urllib.parse import quote

from mqtt_pairing.errors import InvalidCodeFormat

__all__ = [
    "ALPHABET",
    "CODE_LENGTH",
    "MAX_RAW_CODE_LENGTH",
    "code_digest",
    "code_fingerprint",
    "format_code",
    "generate_code",
    "mask_code",
    "normalise_code",
    "pairing_uri",
]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""Crockford base32: digits and upper-case letters without I, L, O and U."""

CODE_LENGTH = 9
"""Characters in a code (9 x 5 = 45 bits)."""

MAX_RAW_CODE_LENGTH = 256
"""Longest raw input `normalise_code` looks at, in characters (checked before NFKC)."""

_BITS_PER_CHAR = 5  # len(ALPHABET) == 2**5
_CODE_BITS = CODE_LENGTH * _BITS_PER_CHAR
_CHAR_MASK = (1 << _BITS_PER_CHAR) - 1
_ALPHABET_SET = frozenset(ALPHABET)
_GROUP = 3
_MASK_TAIL = "**-***-***"  # everything of ABC-DEF-GHJ after the first character

# docs/protocol.md "Codes": separators removed after NFKC (White_Space, U+2212, '.', '_' and
# invisible characters; dash punctuation, category Pd, is tested separately). The list is
# explicit on purpose: str.isspace() also matches U+001C-U+001F, which must stay invalid.
_WHITE_SPACE = (
    "\t\n\v\f\r \u0085\u00a0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
_INVISIBLE = "\u00ad\u200b\u200c\u200d\u2060\ufeff"
_SEPARATORS = frozenset(_WHITE_SPACE + _INVISIBLE + "\u2212._")
_UPPER_ASCII = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)
_LOOKALIKES = str.maketrans({"O": "0", "I": "1", "L": "1"})

DIGEST_HEX_CHARS = 24
"""A code digest: the first 96 bits of HMAC-SHA256 as hex (`code_digest`)."""
CODE_GROUP_HEX = 2
"""Hex characters of the digest that name its group: 256 groups."""
_FINGERPRINT_HEX_CHARS = 8
_DIGEST_PATTERN = re.compile(r"[0-9a-f]{24}")


def generate_code(randbits: Callable[[int], int] = secrets.randbits) -> str:
    """Draw a new code.

    Calls ``randbits(45)`` once and maps each 5-bit group (most significant first) to an
    alphabet character. The alphabet has exactly 32 symbols, so every code is equally
    likely and there is no modulo bias (docs/protocol.md, "Codes").

    Args:
        randbits: a CSPRNG ``k -> int in [0, 2**k)``; replaceable only in tests.

    Returns:
        9 alphabet characters without separators, e.g. ``"7KQM2X9PZ"``.

    Raises:
        ValueError: `randbits` returned a value outside ``[0, 2**45)``.
    """
    value = randbits(_CODE_BITS)
    if not 0 <= value < (1 << _CODE_BITS):
        raise ValueError("randbits returned a value out of range")
    chars = [
        ALPHABET[(value >> (_BITS_PER_CHAR * (CODE_LENGTH - 1 - i))) & _CHAR_MASK]
        for i in range(CODE_LENGTH)
    ]
    return "".join(chars)


def _is_code(value: str) -> bool:
    return len(value) == CODE_LENGTH and all(c in _ALPHABET_SET for c in value)


def format_code(code: str) -> str:
    """Show a normalised code in groups of three: ``"7KQM2X9PZ"`` -> ``"7KQ-M2X-9PZ"``.

    Args:
        code: 9 alphabet characters (as from `generate_code` or `normalise_code`).

    Returns:
        The code as ``ABC-DEF-GHJ``.

    Raises:
        ValueError: `code` is not 9 alphabet characters.
    """
    if not _is_code(code):
        raise ValueError("not a normalised code")
    return "-".join(code[i : i + _GROUP] for i in range(0, CODE_LENGTH, _GROUP))


def normalise_code(raw: str) -> str:
    """Normalise a code typed or pasted by a person (docs/protocol.md, "Codes").

    In this order: Unicode NFKC; remove White_Space characters, dash punctuation
    (category Pd), U+2212, ``.``, ``_`` and invisible characters (U+00AD, U+200B-U+200D,
    U+2060, U+FEFF); upper-case ASCII ``a``-``z`` only; ``O`` -> ``0``, ``I``/``L`` ->
    ``1``. Idempotent.

    Args:
        raw: the code as received, at most `MAX_RAW_CODE_LENGTH` characters.

    Returns:
        9 alphabet characters, e.g. ``"7KQM2X9PZ"``.

    Raises:
        InvalidCodeFormat: anything but exactly 9 alphabet characters is left, or the input
            is not a string or too long. The message never echoes the input.
    """
    if not isinstance(raw, str) or len(raw) > MAX_RAW_CODE_LENGTH:
        raise InvalidCodeFormat
    text = unicodedata.normalize("NFKC", raw)
    kept = "".join(c for c in text if c not in _SEPARATORS and unicodedata.category(c) != "Pd")
    code = kept.translate(_UPPER_ASCII).translate(_LOOKALIKES)
    if not _is_code(code):
        raise InvalidCodeFormat
    return code


def code_digest(secret: bytes, code: str) -> str:
    """Digest under which a code is stored and looked up.

    Args:
        secret: the HMAC key (derived from ``PAIRING_SECRET``).
        code: a code in any form `normalise_code` accepts; it is normalised first.

    Returns:
        The first 96 bits of HMAC-SHA256(secret, normalised code as ASCII), as 24
        lower-case hex characters. 96 bits keep digests of different codes apart (the
        code space is 45 bits) and keep the key `code:{code:<digest>}` at 44 characters
        under the default prefix, one jemalloc size class below 52 (16 bytes per code).

    Raises:
        InvalidCodeFormat: `code` does not normalise to a valid code.
    """
    normalised = normalise_code(code)
    mac = hmac.new(secret, normalised.encode("ascii"), hashlib.sha256)
    return mac.hexdigest()[:DIGEST_HEX_CHARS]


def code_group(digest: str) -> str:
    """The group of a code: the first two hex characters of its digest (256 groups).

    A code's hash, its claims and the tombstone strings of its group share the Redis hash
    tag `{c:<group>}` (`store.keys`), so the claim can answer `CODE_EXPIRED` from the
    tombstones in the same script: one script, one Redis Cluster slot (docs/design.md). 256
    groups spread over a cluster's slots like any other tag.
    """
    return digest[:CODE_GROUP_HEX]


def code_fingerprint(digest: str) -> str:
    """Short fingerprint of a code digest, for logs and history.

    It is a hash of the digest rather than a prefix of it, so a log line does not reveal
    the store key of the code.

    Args:
        digest: 24 lower-case hex characters, as returned by `code_digest`.

    Returns:
        The first 8 hex characters of SHA-256(digest as ASCII), lower-case.

    Raises:
        ValueError: `digest` is not 24 lower-case hex characters.
    """
    if _DIGEST_PATTERN.fullmatch(digest) is None:
        raise ValueError("not a code digest")
    return hashlib.sha256(digest.encode("ascii")).hexdigest()[:_FINGERPRINT_HEX_CHARS]


def mask_code(first_char: str, digest: str) -> str:
    """Show a code to an operator without revealing it (docs/protocol.md, "Codes").

    Args:
        first_char: the first character of the normalised code.
        digest: the code's digest, as returned by `code_digest`.

    Returns:
        E.g. ``"7**-***-*** #3f9a1c2e"``: the first character, the rest as ``*`` in the
        ``ABC-DEF-GHJ`` shape, a space, ``#`` and `code_fingerprint` of the digest.

    Raises:
        ValueError: `first_char` is not one alphabet character, or `digest` is not a digest.
    """
    if len(first_char) != 1 or first_char not in _ALPHABET_SET:
        raise ValueError("not a code character")
    return f"{first_char}{_MASK_TAIL} #{code_fingerprint(digest)}"


def pairing_uri(code: str, runner_id: str) -> str:
    """URI an app can open (or scan as a QR code) to pair with a runner.

    Args:
        code: a code in any form `normalise_code` accepts.
        runner_id: the runner's id; it is percent-encoded with no safe characters.

    Returns:
        ``mqtt-pairing://pair?code=7KQM2X9PZ&runner=<url-encoded runner_id>``
        (docs/protocol.md, runner ``code``).

    Raises:
        InvalidCodeFormat: `code` does not normalise to a valid code.
    """
    normalised = normalise_code(code)
    return f"mqtt-pairing://pair?code={normalised}&runner={quote(runner_id, safe='')}"
