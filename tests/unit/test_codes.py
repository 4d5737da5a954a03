"""Tests of mqtt_pairing.codes: docs/protocol.md "Codes".

Vectors: tests/data/vectors/code-normalisation.json.
"""

from __future__ import annotations

import json
import secrets
import unicodedata
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_pairing.codes import (
    ALPHABET,
    CODE_LENGTH,
    MAX_RAW_CODE_LENGTH,
    code_digest,
    code_fingerprint,
    format_code,
    generate_code,
    mask_code,
    normalise_code,
    pairing_uri,
)
from mqtt_pairing.errors import InvalidCodeFormat, PairingErrorCode

VECTORS = Path(__file__).resolve().parents[1] / "data" / "vectors"
SECRET = b"test-secret-0123456789abcdef0123"


def _load_cases() -> list[dict[str, str | None]]:
    # A missing vectors file must fail collection, never skip.
    data = json.loads((VECTORS / "code-normalisation.json").read_text(encoding="utf-8"))
    cases: list[dict[str, str | None]] = data["cases"]
    assert cases
    return cases


NORMALISATION_CASES = _load_cases()

codes_st = st.text(alphabet=ALPHABET, min_size=CODE_LENGTH, max_size=CODE_LENGTH)

# Everything normalise_code must remove (docs/protocol.md "Codes"), Pd taken from the database.
WHITE_SPACE = (
    "\t\n\v\f\r \u0085\u00a0\u1680"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
    + "\u2028\u2029\u202f\u205f\u3000"
)
DASHES = "".join(chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == "Pd")
SEPARATORS = WHITE_SPACE + DASHES + "\u2212._" + "\u00ad\u200b\u200c\u200d\u2060\ufeff"


def test_alphabet_is_crockford_base32() -> None:
    assert len(ALPHABET) == 32
    assert len(set(ALPHABET)) == 32
    assert set(ALPHABET).isdisjoint("ILOU")
    assert CODE_LENGTH == 9


def test_vectors_cover_both_outcomes() -> None:
    assert any(c["error"] is None for c in NORMALISATION_CASES)
    assert any(c["error"] == "INVALID_FORMAT" for c in NORMALISATION_CASES)


@pytest.mark.parametrize(
    "case", NORMALISATION_CASES, ids=[repr(c["input"]) for c in NORMALISATION_CASES]
)
def test_normalisation_vector(case: dict[str, str | None]) -> None:
    raw = case["input"]
    assert raw is not None
    if case["error"] is None:
        assert normalise_code(raw) == case["normalised"]
    else:
        assert case["error"] == PairingErrorCode.INVALID_FORMAT
        with pytest.raises(InvalidCodeFormat) as info:
            normalise_code(raw)
        assert info.value.code is PairingErrorCode.INVALID_FORMAT


@pytest.mark.parametrize(
    "raw",
    [
        "7KQ\x1cM2X\x1d9PZ",  # str.isspace() is True for these; White_Space is not
        "7KQ\x00M2X9PZ",
        "7KQ\u200eM2X9PZ",  # LRM: a format character, not in the invisible list
        "7KQ-M2X-9PU",
        "7KQ-M2X-9P\u0130",  # dotted capital I: not ASCII
        "\u0131" * 9,  # dotless i: upper() would make it I
    ],
)
def test_other_characters_are_refused(raw: str) -> None:
    with pytest.raises(InvalidCodeFormat):
        normalise_code(raw)


def test_huge_input_is_refused_before_nfkc() -> None:
    # Padded with separators so that it would normalise to a valid code if not bounded.
    with pytest.raises(InvalidCodeFormat):
        normalise_code("7KQM2X9PZ" + " " * MAX_RAW_CODE_LENGTH)
    assert normalise_code("7KQM2X9PZ" + " " * (MAX_RAW_CODE_LENGTH - 9)) == "7KQM2X9PZ"


def test_invalid_format_message_does_not_echo_input() -> None:
    with pytest.raises(InvalidCodeFormat) as info:
        normalise_code("7KQ-M2X-9PU")
    assert "7KQ" not in str(info.value)


@given(codes_st)
def test_code_normalises_to_itself(code: str) -> None:
    assert normalise_code(code) == code
    assert normalise_code(format_code(code)) == code


def _full_width(c: str) -> str:
    return chr(ord(c) + 0xFEE0)


@st.composite
def sloppy_renderings(draw: st.DrawFn) -> tuple[str, str]:
    code = draw(codes_st)
    pieces: list[str] = []
    for c in code:
        pieces.append(draw(st.text(alphabet=SEPARATORS, max_size=3)))
        variants = {c, c.lower()}
        if c == "0":
            variants |= {"O", "o"}
        elif c == "1":
            variants |= {"I", "i", "L", "l"}
        variants |= {_full_width(v) for v in set(variants)}
        pieces.append(draw(st.sampled_from(sorted(variants))))
    pieces.append(draw(st.text(alphabet=SEPARATORS, max_size=3)))
    return code, "".join(pieces)


@given(st.one_of(st.text(max_size=40), sloppy_renderings().map(lambda pair: pair[1])))
def test_normalise_is_idempotent(raw: str) -> None:
    try:
        once = normalise_code(raw)
    except InvalidCodeFormat:
        return
    assert normalise_code(once) == once


@given(sloppy_renderings())
def test_sloppy_rendering_normalises_to_code(rendering: tuple[str, str]) -> None:
    code, raw = rendering
    assert normalise_code(raw) == code


@given(codes_st, st.integers(0, CODE_LENGTH - 1), st.sampled_from(["U", "u", "\uff35"]))
def test_u_is_refused(code: str, position: int, u: str) -> None:
    # U is the only ASCII letter outside the alphabet without a look-alike mapping.
    with pytest.raises(InvalidCodeFormat):
        normalise_code(code[:position] + u + code[position + 1 :])


@given(st.integers(0, (1 << 45) - 1))
def test_every_45_bit_value_gives_a_distinct_valid_code(value: int) -> None:
    code = generate_code(lambda _k: value)
    assert normalise_code(code) == code
    decoded = 0
    for c in code:
        decoded = (decoded << 5) | ALPHABET.index(c)
    assert decoded == value


def test_generate_code_uses_secrets_by_default() -> None:
    assert generate_code.__defaults__ == (secrets.randbits,)
    assert generate_code() != generate_code()  # fails with probability 2**-45


def test_generate_code_maps_5_bit_groups_most_significant_first() -> None:
    calls: list[int] = []

    def fake(indices: list[int]) -> Callable[[int], int]:
        def randbits(k: int) -> int:
            calls.append(k)
            value = 0
            for i in indices:
                value = (value << 5) | i
            return value

        return randbits

    assert generate_code(fake([0] * 9)) == "000000000"
    assert generate_code(fake([31] * 9)) == "ZZZZZZZZZ"
    assert generate_code(fake(list(range(9)))) == "012345678"
    assert generate_code(fake(list(range(10, 19)))) == "ABCDEFGHJ"
    assert generate_code(fake([7, 19, 23, 20, 2, 29, 9, 22, 31])) == "7KQM2X9PZ"
    assert calls == [45] * 5


@pytest.mark.parametrize("value", [-1, 1 << 45])
def test_generate_code_refuses_out_of_range_bits(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        generate_code(lambda _k: value)


def test_generated_characters_are_uniform() -> None:
    n_codes = 100_000
    counts = Counter("".join(generate_code() for _ in range(n_codes)))
    assert set(counts) == set(ALPHABET)
    expected = n_codes * CODE_LENGTH / len(ALPHABET)
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in ALPHABET)
    # 31 degrees of freedom: P(chi2 > 70.0) ~ 7.6e-5 for a uniform source.
    assert chi2 < 70.0


def test_format_code() -> None:
    assert format_code("7KQM2X9PZ") == "7KQ-M2X-9PZ"


@pytest.mark.parametrize("bad", ["7KQM2X9P", "7KQ-M2X-9PZ", "7kqm2x9pz", "7KQM2X9PU"])
def test_format_code_refuses_non_codes(bad: str) -> None:
    with pytest.raises(ValueError, match="normalised"):
        format_code(bad)


def test_code_digest_known_answer() -> None:
    # printf 7KQM2X9PZ | openssl dgst -sha256 -hmac test-secret-0123456789abcdef0123
    # (the first 96 bits: 24 hex characters)
    expected = "d90074cd212a6259a71b6fff"
    assert code_digest(SECRET, "7KQM2X9PZ") == expected
    assert code_digest(SECRET, "7kq-m2x-9pz") == expected
    assert code_digest(b"another secret of at least 32 bytes", "7KQM2X9PZ") != expected


def test_code_digest_refuses_invalid_code() -> None:
    with pytest.raises(InvalidCodeFormat):
        code_digest(SECRET, "7KQ-M2X-9PU")


def test_code_fingerprint_known_answer() -> None:
    # printf d90074cd212a6259a71b6fff | sha256sum
    assert code_fingerprint("d90074cd212a6259a71b6fff") == "d7a1a8d2"


@pytest.mark.parametrize(
    "bad", ["", "D90074CD212A6259A71B6FFF", "d90074cd212a6259a71b6fffca2b9401", "7KQM2X9PZ"]
)
def test_code_fingerprint_refuses_non_digests(bad: str) -> None:
    with pytest.raises(ValueError, match="digest"):
        code_fingerprint(bad)


def test_mask_code_example_shape() -> None:
    digest = code_digest(SECRET, "7KQM2X9PZ")
    assert mask_code("7", digest) == "7**-***-*** #d7a1a8d2"


@given(codes_st)
def test_mask_code_shows_only_the_first_character(code: str) -> None:
    digest = code_digest(SECRET, code)
    masked = mask_code(code[0], digest)
    shown, fingerprint = masked.split(" #")
    assert shown == code[0] + "**-***-***"
    assert fingerprint == code_fingerprint(digest)
    assert fingerprint not in digest  # the store key cannot be read off a log line


@pytest.mark.parametrize("bad", ["", "77", "U", "7KQ"])
def test_mask_code_refuses_more_than_one_character(bad: str) -> None:
    with pytest.raises(ValueError, match="code character"):
        mask_code(bad, "d90074cd212a6259a71b6fffca2b9401")


@pytest.mark.parametrize(
    ("runner_id", "encoded"),
    [
        ("runner-1", "runner-1"),
        ("a.b_c-D9", "a.b_c-D9"),
        ("a b/c&d=e?f#g", "a%20b%2Fc%26d%3De%3Ff%23g"),
        ("é", "%C3%A9"),
    ],
)
def test_pairing_uri(runner_id: str, encoded: str) -> None:
    assert (
        pairing_uri("7KQ-M2X-9PZ", runner_id)
        == f"mqtt-pairing://pair?code=7KQM2X9PZ&runner={encoded}"
    )
