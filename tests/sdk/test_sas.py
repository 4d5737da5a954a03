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
    commitment,
    derive_session_secrets,
    encode_commitment,
    encode_public_key,
    key_id,
    opens,
    parse_commitment,
    parse_public_key,
    sas_words,
    transcript,
)
from mqtt_pairing.sdk.e2e import (
    KeyPair,
    RunnerKeyRing,
    agree,
    nonce_data,
    read_nonce,
    read_reveal,
    reveal_data,
)

VECTORS = json.loads(
    (Path(__file__).parents[1] / "data" / "vectors" / "sas.json").read_text("utf-8")
)
BIP39_ENGLISH_SHA256 = "2f5eed53a4727b4bf8880d8f3f199efc90e58503646d9ff8eff3a2ed3b24dbda"

session_ids = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64
)
private_keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=32, max_size=32)


def test_word_list_is_bip39_english() -> None:
    words = sas_words()
    digest = hashlib.sha256(("\n".join(words) + "\n").encode()).hexdigest()
    assert digest == BIP39_ENGLISH_SHA256
    assert len({w[:4] for w in words}) == 2048


@pytest.mark.parametrize("case", VECTORS["derivations"], ids=lambda c: c["description"])
def test_vectors(case: dict[str, Any]) -> None:
    runner = KeyPair.from_private_bytes(bytes.fromhex(case["runner_private_key"]))
    app = KeyPair.from_private_bytes(bytes.fromhex(case["app_private_key"]))
    app_nonce = bytes.fromhex(case["app_nonce"])
    runner_nonce = bytes.fromhex(case["runner_nonce"])
    assert runner.public.hex() == case["runner_public_key_raw"]
    assert app.public.hex() == case["app_public_key_raw"]
    assert runner.wire() == case["runner_public_key"]
    assert runner.key_id == case["runner_key_id"]
    # Commit (in `pair`), nonce (runner's `message`), reveal (app's `message`).
    assert commitment(app.public, app_nonce).hex() == case["app_commitment"]
    assert app.commit(app_nonce, peer_key_id=runner.key_id) == case["app_commitment_field"]
    assert nonce_data(runner_nonce) == case["runner_message"]
    assert reveal_data(app, app_nonce) == case["app_message"]
    assert read_nonce(case["runner_message"]) == runner_nonce
    assert read_reveal(case["app_message"]) == (app.public, app_nonce)
    found = parse_commitment(case["app_commitment_field"])
    assert found.peer_key_id == runner.key_id
    assert opens(found.digest, app.public, app_nonce)
    info = transcript(case["session_id"], runner.public, app.public, app_nonce, runner_nonce)
    assert info.hex() == case["hkdf_info"]
    shared = bytes.fromhex(case["shared_secret"])
    secrets = derive_session_secrets(
        shared, case["session_id"], runner.public, app.public, app_nonce, runner_nonce
    )
    assert secrets.session_key.hex() == case["session_key"]
    assert list(secrets.sas.words) == case["sas_words"]
    assert secrets.sas.digits == case["sas_digits"]
    value = int(case["sas_value"])
    assert int(case["okm"][64:], 16) == value
    assert f"{value % 10**6:06d}" == case["sas_digits"]
    # Both sides, from their own private key and the other's public key.
    nonces_ = {"app_nonce": app_nonce, "runner_nonce": runner_nonce}
    assert agree(runner, app.public, case["session_id"], own_role="runner", **nonces_) == secrets
    assert agree(app, runner.public, case["session_id"], own_role="app", **nonces_) == secrets


@pytest.mark.parametrize("case", VECTORS["reveals_that_do_not_open"], ids=lambda c: c["why"])
def test_reveals_that_do_not_open_the_commitment(case: dict[str, str]) -> None:
    digest = bytes.fromhex(case["app_commitment"])
    assert not opens(digest, bytes.fromhex(case["public_key_raw"]), bytes.fromhex(case["nonce"]))


@pytest.mark.parametrize("case", VECTORS["invalid_commitments"], ids=lambda c: c["why"])
def test_invalid_commitments_are_refused(case: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_commitment(case["public_key"])
    assert RunnerKeyRing().for_commitment(case["public_key"]) is None


def test_a_runner_key_runs_one_exchange_per_use_of_its_code() -> None:
    ring = RunnerKeyRing()
    pair = ring.new()
    assert ring.claim(pair.key_id, "s1") == "new"
    assert ring.claim(pair.key_id, "s1") == "again"  # the same session: not a second use
    assert ring.claim(pair.key_id, "s2") == "spent"  # one use: retired
    ring.allow(pair.key_id, 3)  # the code's max_uses, from the `code` result
    assert [ring.claim(pair.key_id, s) for s in ("s2", "s3", "s4")] == ["new", "new", "spent"]
    assert ring.claim(KeyPair.generate().key_id, "s5") == "spent"  # not ours
    restored = KeyPair.generate()
    ring.add(restored, uses=0)
    assert ring.claim(restored.key_id, "s6") == "spent"


@pytest.mark.parametrize("case", VECTORS["invalid_public_keys"], ids=lambda c: c["why"])
def test_invalid_public_keys_are_refused(case: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        parse_public_key(case["public_key"])


@pytest.mark.parametrize("case", VECTORS["low_order_public_keys"], ids=lambda c: c["why"])
def test_low_order_keys_are_refused(case: dict[str, str]) -> None:
    raw = parse_public_key(case["public_key"]).raw
    with pytest.raises(ValueError):
        agree(KeyPair.generate(), raw, "s", own_role="app", **_NONCES)


_NONCES = {"app_nonce": bytes(32), "runner_nonce": bytes(32)}


@given(private_keys, private_keys, session_ids, nonces, nonces)
def test_both_sides_derive_the_same(
    runner_raw: bytes, app_raw: bytes, session_id: str, app_nonce: bytes, runner_nonce: bytes
) -> None:
    runner = KeyPair.from_private_bytes(runner_raw)
    app = KeyPair.from_private_bytes(app_raw)
    both = {"app_nonce": app_nonce, "runner_nonce": runner_nonce}
    try:
        mine = agree(runner, app.public, session_id, own_role="runner", **both)
    except ValueError:  # a clamped key of low order: both sides refuse alike
        with pytest.raises(ValueError):
            agree(app, runner.public, session_id, own_role="app", **both)
        return
    assert agree(app, runner.public, session_id, own_role="app", **both) == mine
    assert len(mine.sas.words) == 4
    assert len(mine.sas.digits) == 6
    assert mine.sas.digits.isdigit()


@given(private_keys, private_keys, private_keys, session_ids, nonces, nonces)
def test_a_swapped_key_changes_the_sas(
    runner_raw: bytes,
    app_raw: bytes,
    mallory_raw: bytes,
    session_id: str,
    app_nonce: bytes,
    runner_nonce: bytes,
) -> None:
    """A relay that gives the runner its own key instead of the app's (and the app its own
    instead of the runner's) knows both shared secrets, but the transcripts differ."""
    runner, app, mallory = (
        KeyPair.from_private_bytes(k) for k in (runner_raw, app_raw, mallory_raw)
    )
    if len({runner.public, app.public, mallory.public}) < 3:
        return
    both = {"app_nonce": app_nonce, "runner_nonce": runner_nonce}
    try:
        at_runner = agree(runner, mallory.public, session_id, own_role="runner", **both)
        at_app = agree(app, mallory.public, session_id, own_role="app", **both)
    except ValueError:
        return
    assert at_runner.session_key != at_app.session_key
    # 64 bits that differ: the words (44 of them) may agree only by a 2**-44 chance.
    assert (at_runner.sas.words, at_runner.sas.digits) != (at_app.sas.words, at_app.sas.digits)


@given(private_keys, nonces, private_keys, nonces)
def test_a_commitment_opens_only_with_its_key_and_nonce(
    app_raw: bytes, app_nonce: bytes, other_raw: bytes, other_nonce: bytes
) -> None:
    app, other = KeyPair.from_private_bytes(app_raw), KeyPair.from_private_bytes(other_raw)
    digest = commitment(app.public, app_nonce)
    assert parse_commitment(encode_commitment(digest)).digest == digest
    assert opens(digest, app.public, app_nonce)
    if (other.public, other_nonce) != (app.public, app_nonce):
        assert not opens(digest, other.public, other_nonce)


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
        transcript(session_id, bytes(32), bytes(32), bytes(32), bytes(32))


def test_key_ring_finds_the_key_a_commitment_names() -> None:
    ring = RunnerKeyRing()
    first, second = ring.new(), ring.new()
    app = KeyPair.generate()
    nonce = bytes(32)
    digest = commitment(app.public, nonce)
    assert ring.for_commitment(app.commit(nonce, peer_key_id=first.key_id)) == (first, digest)
    # Without a hint, the newest key.
    assert ring.for_commitment(app.commit(nonce)) == (second, digest)
    assert ring.for_commitment(app.commit(nonce, peer_key_id=key_id(b"other"))) is None
    # A bare key (version 1 of the scheme) is not a commitment.
    assert ring.for_commitment(app.wire()) is None
    assert ring.for_commitment("not ours") is None


def test_key_ring_forgets_the_oldest() -> None:
    ring = RunnerKeyRing()
    oldest = ring.new()
    for _ in range(32):
        ring.new()
    app = KeyPair.generate()
    assert ring.for_commitment(app.commit(bytes(32), peer_key_id=oldest.key_id)) is None
