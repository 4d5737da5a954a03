"""Tests of mqtt_pairing.payload: docs/protocol.md "Payloads".

Vectors: tests/data/vectors/payloads.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_pairing.errors import InvalidRequest, PairingErrorCode
from mqtt_pairing.payload import (
    MAX_DEPTH,
    MAX_PAYLOAD_BYTES,
    InvalidPayload,
    compact_json_size,
    extract_request_id,
    is_clean_name,
    parse_payload,
)

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"


def _load_pair_cases() -> list[dict[str, Any]]:
    # A missing vectors file must fail collection, never skip.
    data = json.loads((VECTORS / "payloads.json").read_text(encoding="utf-8"))
    cases: list[dict[str, Any]] = data["pair"]
    assert cases
    return cases


PAIR_CASES = _load_pair_cases()


def _outcome(data: bytes) -> tuple[bool, str | None]:
    """(parsed?, request_id the reply carries) as the dispatcher derives them."""
    try:
        obj = parse_payload(data)
    except InvalidPayload as exc:
        return False, exc.request_id
    return True, extract_request_id(obj)


@pytest.mark.parametrize(
    "case", PAIR_CASES, ids=[c.get("note", c["payload"][:20]) for c in PAIR_CASES]
)
def test_pair_vector(case: dict[str, Any]) -> None:
    parsed, request_id = _outcome(case["payload"].encode("utf-8"))
    assert request_id == case["reply_request_id"]
    if case["error"] is None:
        assert parsed


@pytest.mark.parametrize(
    ("payload", "request_id"),
    [
        ('{"request_id":"r9","metadata":{"x":NaN}}', "r9"),
        ('{"request_id":"r9","metadata":[Infinity]}', "r9"),
        ('{"request_id":"r9","ttl_s":-Infinity}', "r9"),
        ('{"request_id":"r9","ttl_s":1e999}', "r9"),  # overflows to inf
        ('{"request_id":"r9","ttl_s":-1e999}', "r9"),
        ('{"request_id":"r10","code":"a","code":"b"}', None),
        ('{"request_id":"r10","metadata":{"a":1,"a":1}}', None),
        ('{"request_id":"r10","request_id":"r10"}', None),
        ('{"request_id":"r11","app_name":"\\ud800"}', "r11"),  # lone surrogate
        ('{"request_id":"r11","\\udfff":1}', "r11"),
        ("", None),
        (" ", None),
        ("{", None),
        ('{"request_id":"r12"} {}', None),
        ('"request_id"', None),
        ("1", None),
        ("true", None),
        ('\ufeff{"request_id":"r13"}', None),  # a BOM is not JSON
    ],
)
def test_refused_payloads(payload: str, request_id: str | None) -> None:
    with pytest.raises(InvalidPayload) as info:
        parse_payload(payload.encode("utf-8"))
    assert info.value.request_id == request_id
    assert isinstance(info.value, InvalidRequest)
    assert info.value.code is PairingErrorCode.INVALID_REQUEST


def _nested(levels: int) -> bytes:
    """A payload whose top-level object is level 1 and which has `levels` levels."""
    inner: Any = 1
    for _ in range(levels - 1):
        inner = {"a": inner}
    return json.dumps(
        {"request_id": "d", "m": inner} if levels > 1 else {"request_id": "d"}
    ).encode()


@pytest.mark.parametrize("levels", [1, 2, MAX_DEPTH])
def test_nesting_up_to_the_limit_is_accepted(levels: int) -> None:
    assert MAX_DEPTH == 32
    assert extract_request_id(parse_payload(_nested(levels))) == "d"


def test_nesting_beyond_the_limit_is_refused() -> None:
    with pytest.raises(InvalidPayload, match="deep") as info:
        parse_payload(_nested(MAX_DEPTH + 1))
    assert info.value.request_id == "d"


def test_arrays_count_as_levels() -> None:
    ok = '{"m":' + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "}"
    assert parse_payload(ok.encode()) == json.loads(ok)
    too_deep = '{"m":' + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "}"
    with pytest.raises(InvalidPayload, match="deep"):
        parse_payload(too_deep.encode())


def test_recursion_bomb_within_the_size_limit_is_refused() -> None:
    half = MAX_PAYLOAD_BYTES // 2
    bomb = ("[" * half + "]" * half).encode()
    assert len(bomb) == MAX_PAYLOAD_BYTES
    with pytest.raises(InvalidPayload) as info:
        parse_payload(bomb)
    assert info.value.request_id is None
    levels = (MAX_PAYLOAD_BYTES - 1) // 6
    objects = ('{"a":' * levels + "1" + "}" * levels).encode()
    assert len(objects) <= MAX_PAYLOAD_BYTES
    with pytest.raises(InvalidPayload):
        parse_payload(objects)


def test_size_limit_is_in_bytes_and_checked_before_decoding() -> None:
    at_limit = b'{"request_id":"s","pad":"' + b"x" * (MAX_PAYLOAD_BYTES - 27) + b'"}'
    assert len(at_limit) == MAX_PAYLOAD_BYTES
    assert extract_request_id(parse_payload(at_limit)) == "s"
    over = at_limit[:-2] + b'x"}'
    with pytest.raises(InvalidPayload, match="too large") as info:
        parse_payload(over)
    assert info.value.request_id is None
    # Invalid UTF-8 over the limit is refused for its size, i.e. before decoding.
    with pytest.raises(InvalidPayload, match="too large"):
        parse_payload(b"\xff" * (MAX_PAYLOAD_BYTES + 1))


def test_multibyte_size_limit() -> None:
    pad = "é" * ((MAX_PAYLOAD_BYTES - 24) // 2 + 1)  # 2 bytes each in UTF-8
    data = json.dumps({"request_id": "s", "p": pad}, ensure_ascii=False).encode()
    assert len(data.decode()) <= MAX_PAYLOAD_BYTES < len(data)
    with pytest.raises(InvalidPayload, match="too large"):
        parse_payload(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"request_id":"r1","code":"\xff"}',
        b'{"request_id":"r1","code":"\xc3"}',  # truncated sequence
        b'{"request_id":"r1","code":"\xc0\xaf"}',  # overlong "/"
        b'{"request_id":"r1","code":"\xed\xa0\x80"}',  # encoded surrogate (CESU-8)
        b'\xef\xbb\xbf{"request_id":"r1"}',  # UTF-8 BOM
    ],
)
def test_invalid_utf8_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidPayload) as info:
        parse_payload(data)
    assert info.value.request_id is None


def test_messages_never_echo_input() -> None:
    secret = "7KQM2X9PZ"
    for data in [
        secret.encode(),
        f'{{"code":"{secret}","code":"{secret}"}}'.encode(),
        f'{{"code":"{secret}","x":NaN}}'.encode(),
        f'["{secret}"]'.encode(),
    ]:
        with pytest.raises(InvalidPayload) as info:
            parse_payload(data)
        assert secret not in str(info.value)
        assert secret not in info.value.message


def test_unknown_fields_and_unicode_are_kept() -> None:
    obj = parse_payload('{"request_id":"r1","extra":{"x":[1,2.5,null]},"n":"é😀"}'.encode())
    assert obj == {"request_id": "r1", "extra": {"x": [1, 2.5, None]}, "n": "é😀"}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"request_id": "r1"}, "r1"),
        ({"request_id": "!" + "~" * 63}, "!" + "~" * 63),
        ({}, None),
        ({"request_id": None}, None),
        ({"request_id": 5}, None),
        ({"request_id": ["r1"]}, None),
        ({"request_id": ""}, None),
        ({"request_id": "x" * 65}, None),
        ({"request_id": "has space"}, None),
        ({"request_id": "r1\n"}, None),
        ({"request_id": "r\x7f"}, None),
        ({"request_id": "é"}, None),
    ],
)
def test_extract_request_id(obj: dict[str, Any], expected: str | None) -> None:
    assert extract_request_id(obj) == expected


@given(
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
)
def test_any_printable_request_id_round_trips(request_id: str) -> None:
    data = json.dumps({"request_id": request_id}).encode()
    assert extract_request_id(parse_payload(data)) == request_id


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_small_json_objects_round_trip(obj: dict[str, Any]) -> None:
    data = json.dumps(obj, ensure_ascii=False).encode()
    if len(data) <= MAX_PAYLOAD_BYTES:
        assert parse_payload(data) == obj
    else:
        with pytest.raises(InvalidPayload, match="too large"):
            parse_payload(data)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_or_raise_invalid_payload(data: bytes) -> None:
    try:
        obj = parse_payload(data)
    except InvalidPayload:
        return
    assert isinstance(obj, dict)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ({}, 2),
        ({"a": 1, "b": [1, 2]}, 17),
        ({"é": "😀"}, 13),  # counted in UTF-8 bytes, not escaped
        ([], 2),
    ],
)
def test_compact_json_size(value: object, size: int) -> None:
    assert compact_json_size(value) == size


def test_compact_json_size_refuses_non_json() -> None:
    with pytest.raises(ValueError, match="JSON"):
        compact_json_size({"x": float("nan")})


@pytest.mark.parametrize("name", ["phone", "Anna's iPhone", "téléphone 📱", "", "a b\u00a0c"])
def test_clean_names(name: str) -> None:
    assert is_clean_name(name)


@pytest.mark.parametrize(
    "name",
    ["a\x07b", "a\nb", "a\tb", "a\x7f", "a\x85", "phone\u202e", "a\u200bb", "\ufeffa", "a\u00adb"],
)
def test_names_with_control_or_format_characters(name: str) -> None:
    assert not is_clean_name(name)
