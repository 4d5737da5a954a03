"""The SAS derivation against its vectors, and its properties (docs/protocol.md,
"End-to-end keys and SAS")."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_pairing.sas import (
    derive_session_secrets,
    encode_public_key,
    key_id,
    parse_public_key,
    sas_words,
    transcript,
)
from mqtt_pairing.sdk.e2e import KeyPair, RunnerKeyRing, agree

VECTORS = json.loads(
    (Path(__file__).parents[1] / "data" / "vectors" / "sas.json").read_text("utf-8")
)
BIP39_ENGLISH_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"

session_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)
private_keys = st.binary(min_size=32, max_size=32)


def test_word_list_is_bip39_english() -> None:
    words = sas_words()
    digest = hashlib.sha256(("\n".join(words) + "\n").encode()).hexdigest()
    assert digest == BIP39_ENGLISH_SHA256
    assert len({w[:4] for w in words}) == 2048


@pytest.mark.parametrize("case", VECTORS["derivations"], ids=lambda c: c["description"])
def test_vectors(case: dict[str, Any]) -> None:
    runner = KeyPair.from_private_bytes(bytes.fromhex(case["runner_private_key"]))
    app = KeyPair.from_private_bytes(bytes.fromhex(case["app_private_key"]))
    assert runner.public.hex() == case["runner_public_key_raw"]
    assert app.public.hex() == case["app_public_key_raw"]
    assert runner.wire() == case["runner_public_key"]
    assert runner.key_id == case["runner_key_id"]
    assert app.wire(peer_key_id=runner.key_id) == case["app_public_key"]
    info = transcript(case["session_id"], runner.public, app.public)
    assert info.hex() == case["hkdf_info"]
    shared = bytes.fromhex(case["shared_secret"])
    secrets = derive_session_secrets(shared, case["session_id"], runner.public, app.public)
    assert secrets.session_key.hex() == case["session_key"]
    assert list(secrets.sas.words) == case["sas_words"]
    assert secrets.sas.digits == case["sas_digits"]
    value = int(case["sas_value"])
    assert int(case["okm"][64:], 16) == value
    assert f"{value % 10**6:06d}" == case["sas_digits"]
    # Both sides, from their own private key and the other's public key.
    assert agree(runner, app.public, case["session_id"], own_role="runner") == secrets
    assert agree(app, runner.public, case["session_id"], own_role="app") == secrets


@pytest.mark.parametrize("case", VECTORS["invalid_public_keys"], ids=lambda c: c["why"])
def test_invalid_public_keys_are_refused(case: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_public_key(case["public_key"])


@pytest.mark.parametrize("case", VECTORS["low_order_public_keys"], ids=lambda c: c["why"])
def test_low_order_keys_are_refused(case: dict[str, str]) -> None:
    raw = parse_public_key(case["public_key"]).raw
    with pytest.raises(ValueError):
        agree(KeyPair.generate(), raw, "s", own_role="app")


@given(private_keys, private_keys, session_ids)
def test_both_sides_derive_the_same(runner_raw: bytes, app_raw: bytes, session_id: str) -> None:
    runner = KeyPair.from_private_bytes(runner_raw)
    app = KeyPair.from_private_bytes(app_raw)
    try:
        mine = agree(runner, app.public, session_id, own_role="runner")
    except ValueError:  # a clamped key of low order: both sides refuse alike
        with pytest.raises(ValueError):
            agree(app, runner.public, session_id, own_role="app")
        return
    assert agree(app, runner.public, session_id, own_role="app") == mine
    assert len(mine.sas.words) == 4
    assert len(mine.sas.digits) == 6
    assert mine.sas.digits.isdigit()


@given(private_keys, private_keys, private_keys, session_ids)
def test_a_swapped_key_changes_the_sas(
    runner_raw: bytes, app_raw: bytes, mallory_raw: bytes, session_id: str
) -> None:
    """A relay that gives the runner its own key instead of the app's (and the app its own
    instead of the runner's) knows both shared secrets, but the transcripts differ."""
    runner, app, mallory = (
        KeyPair.from_private_bytes(k) for k in (runner_raw, app_raw, mallory_raw)
    )
    if len({runner.public, app.public, mallory.public}) < 3:
        return
    try:
        at_runner = agree(runner, mallory.public, session_id, own_role="runner")
        at_app = agree(app, mallory.public, session_id, own_role="app")
    except ValueError:
        return
    assert at_runner.session_key != at_app.session_key
    # 64 bits that differ: the words (44 of them) may agree only by a 2**-44 chance.
    assert (at_runner.sas.words, at_runner.sas.digits) != (at_app.sas.words, at_app.sas.digits)


@given(st.binary(min_size=32, max_size=32), st.none() | st.text("abcXYZ019-_", min_size=1))
def test_public_keys_round_trip(raw: bytes, hint: str | None) -> None:
    parsed = parse_public_key(encode_public_key(raw, peer_key_id=hint))
    assert parsed.raw == raw
    assert parsed.peer_key_id == hint


@given(st.text(max_size=80))
def test_parse_never_crashes(text: str) -> None:
    try:
        parsed = parse_public_key(text)
    except ValueError:
        return
    assert len(parsed.raw) == 32


@pytest.mark.parametrize("session_id", ["", "x" * 65, "with space", "caf\u00e9"])
def test_bad_session_ids_are_refused(session_id: str) -> None:
    with pytest.raises(ValueError):
        transcript(session_id, bytes(32), bytes(32))


def test_key_ring_finds_the_key_an_app_names() -> None:
    ring = RunnerKeyRing()
    first, second = ring.new(), ring.new()
    app = KeyPair.generate()
    found = ring.for_app_key(app.wire(peer_key_id=first.key_id))
    assert found == (first, app.public)
    # Without a hint, the newest key.
    assert ring.for_app_key(app.wire()) == (second, app.public)
    assert ring.for_app_key(app.wire(peer_key_id=key_id(b"other"))) is None
    assert ring.for_app_key("not ours") is None


def test_key_ring_forgets_the_oldest() -> None:
    ring = RunnerKeyRing()
    oldest = ring.new()
    for _ in range(32):
        ring.new()
    assert ring.for_app_key(KeyPair.generate().wire(peer_key_id=oldest.key_id)) is None
