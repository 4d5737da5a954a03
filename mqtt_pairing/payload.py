"""Request payload parsing and small payload checks (pure, no I/O).

docs/protocol.md, "Payloads": UTF-8 JSON objects of at most 4096 bytes, nested at most 32
deep, with no duplicate keys and no NaN/Infinity. `parse_payload` enforces exactly that
and nothing else; field-level validation (types, lengths, names) belongs to the models.

Every failure raises `InvalidPayload` (an `InvalidRequest`) with a fixed message that
never echoes input. Its ``request_id`` attribute tells the dispatcher what the error reply
carries: the payload's request_id when the payload is a trustworthy JSON object that is
refused for its content (NaN, too deep, a lone surrogate), else None (too large, not
UTF-8, not JSON, not an object, duplicate keys: the object is not trusted).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from mqtt_pairing.errors import InvalidRequest

__all__ = [
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "REQUEST_ID_PATTERN",
    "InvalidPayload",
    "compact_json_size",
    "extract_request_id",
    "is_clean_name",
    "parse_payload",
]

MAX_PAYLOAD_BYTES = 4096
"""Largest payload that is parsed at all, in bytes."""

MAX_DEPTH = 32
"""Deepest nesting of objects and arrays; the top-level object is depth 1."""

REQUEST_ID_PATTERN = re.compile(r"\A[\x21-\x7e]{1,64}\Z")
"""request_id: 1-64 printable ASCII characters without space (0x21-0x7E)."""

_UNTRUSTED_CATEGORIES = frozenset({"Cc", "Cf"})


class InvalidPayload(InvalidRequest):
    """A payload `parse_payload` refuses (INVALID_REQUEST).

    Attributes:
        request_id: the request_id the error reply carries, or None when the payload is
            not a trustworthy JSON object (docs/protocol.md: ``request_id`` is null only when
            the payload is not a JSON object or its request_id is missing or invalid).
    """

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class _Decoder:
    """json.loads hooks: refuse duplicate keys at once, note non-finite numbers."""

    def __init__(self) -> None:
        self.non_finite = False

    def object_pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            raise InvalidPayload("payload has duplicate keys")
        return obj

    def constant(self, _name: str) -> None:
        self.non_finite = True

    def float_(self, text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # e.g. 1e999
            self.non_finite = True
        return value


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _content_problem(value: object) -> str | None:
    """Walk a decoded value iteratively; name the first depth or text problem, if any."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                return "payload is nested too deep"
            for key, child in item.items():
                if _has_surrogate(key):
                    return "payload has invalid text"
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                return "payload is nested too deep"
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str) and _has_surrogate(item):
            return "payload has invalid text"
    return None


def parse_payload(data: bytes) -> dict[str, Any]:
    """Parse a request payload (docs/protocol.md, "Payloads").

    The size is checked before anything is decoded; then strict UTF-8, JSON without
    duplicate keys and without NaN/Infinity (including numbers that overflow to
    infinity), at most `MAX_DEPTH` levels, no lone surrogates in strings, and a JSON
    object at the top.

    Args:
        data: the raw MQTT payload.

    Returns:
        The decoded object. Unknown fields are kept (the models ignore them).

    Raises:
        InvalidPayload: the payload is refused; ``request_id`` says what the reply carries.
    """
    if len(data) > MAX_PAYLOAD_BYTES:
        raise InvalidPayload("payload too large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPayload("payload is not UTF-8") from None
    decoder = _Decoder()
    try:
        value = json.loads(
            text,
            object_pairs_hook=decoder.object_pairs,
            parse_constant=decoder.constant,
            parse_float=decoder.float_,
        )
    except RecursionError:
        raise InvalidPayload("payload is nested too deep") from None
    except ValueError:
        raise InvalidPayload("payload is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidPayload("payload is not a JSON object")
    if decoder.non_finite:
        raise InvalidPayload("payload has NaN or Infinity", request_id=extract_request_id(value))
    problem = _content_problem(value)
    if problem is not None:
        raise InvalidPayload(problem, request_id=extract_request_id(value))
    return value


def extract_request_id(obj: dict[str, Any]) -> str | None:
    """The request_id of a parsed payload, if it is valid.

    Args:
        obj: a payload returned by `parse_payload`.

    Returns:
        ``obj["request_id"]`` when it is a string of 1-64 characters 0x21-0x7E, else None
        (the reply then carries ``"request_id": null``).
    """
    value = obj.get("request_id")
    if isinstance(value, str) and REQUEST_ID_PATTERN.fullmatch(value) is not None:
        return value
    return None


def compact_json_size(value: object) -> int:
    """Size of `value` as compact UTF-8 JSON, in bytes (for the 1024-byte metadata limit).

    Args:
        value: a JSON-compatible value (e.g. the ``metadata`` object).

    Returns:
        ``len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())``.

    Raises:
        ValueError: `value` holds NaN/Infinity or a lone surrogate.
        TypeError: `value` is not JSON-serialisable.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return len(text.encode("utf-8"))


def is_clean_name(value: str) -> bool:
    """Whether a name holds no control or format character (Unicode Cc, Cf).

    Args:
        value: a ``runner_name`` or ``app_name`` (its length is checked by the models).

    Returns:
        False if any character is in category Cc or Cf (e.g. U+0007, U+202E), else True.
    """
    return not any(unicodedata.category(c) in _UNTRUSTED_CATEGORIES for c in value)
