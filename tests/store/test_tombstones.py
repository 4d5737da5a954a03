"""Tombstone records in Redis (add_tombstone.lua, find_tombstone.lua) against the pure
arithmetic of mqtt_pairing.tombstones, on every store backend."""

from __future__ import annotations

import hashlib

import pytest

from mqtt_pairing.errors import CodeExpired
from mqtt_pairing.store import PairingStore
from mqtt_pairing.tombstones import BUCKETS, RECORD_BYTES, TombstoneLayout
from tests.harness.waiting import wait_redis_time
from tests.store.helpers import all_keys, redis_now_ms

LAYOUT = TombstoneLayout(tombstone_ms=60_000)  # 10 s windows


def _digest(i: int) -> str:
    return hashlib.sha256(f"code-{i}".encode()).hexdigest()[:24]


async def _add(store: PairingStore, digest: str, expires_ms: int) -> None:
    await store.call(store.tombstone_call(LAYOUT, digest, expires_ms))


async def test_the_script_answers_as_the_arithmetic_says(store: PairingStore) -> None:
    now = await redis_now_ms(store.client)
    # expiries relative to now, at least 2 s from where the answer changes
    deltas = [-62_000, -58_000, -30_000, -10_000, -2_000, 2_000, 30_000, 300_000]
    digests = {delta: _digest(i) for i, delta in enumerate(deltas)}
    for delta, digest in digests.items():
        await _add(store, digest, now + delta)
    for delta, digest in digests.items():
        expected = -LAYOUT.tombstone_ms < delta <= 0
        assert await store.find_tombstone(LAYOUT, digest, now) is expected, delta
    # a code that never had a record
    assert not await store.find_tombstone(LAYOUT, _digest(999), now)


async def test_many_codes_share_a_string_and_each_is_found(store: PairingStore) -> None:
    now = await redis_now_ms(store.client)
    expired = ["ab" + _digest(i)[2:] for i in range(200)]  # all in one group
    for i, digest in enumerate(expired):
        await _add(store, digest, now - 5_000 - i)
    keys = [k for k in await all_keys(store.client, store.keys.prefix) if ":tomb:" in k]
    assert len(keys) <= 2 * BUCKETS  # one or two windows, each bucket
    assert sum([await store.client.strlen(k) for k in keys]) == RECORD_BYTES * len(expired)
    for digest in expired:
        assert await store.find_tombstone(LAYOUT, digest, now)
    assert not await store.find_tombstone(LAYOUT, "ab" + _digest(1000)[2:], now)


def _unaligned_twin(expires_ms: int) -> tuple[str, str]:
    """A digest, and another of the same group and bucket whose fingerprint is the first
    one's record read one byte late (4 fingerprint bytes and the offset byte)."""
    for i in range(1000):
        first = _digest(i)
        place = LAYOUT.place(first, expires_ms)
        raw = bytes.fromhex(place.fingerprint) + bytes([place.offset])
        twin = first[:2] + raw[1:6].hex() + first[12:]
        if LAYOUT.bucket(twin) == LAYOUT.bucket(first):
            return first, twin
    raise AssertionError("no digest found")


async def test_only_whole_records_match(store: PairingStore) -> None:
    # A fingerprint that appears in the string inside a record, or across two, is not a
    # record of its own.
    now = await redis_now_ms(store.client)
    first, twin = _unaligned_twin(now - 5_000)
    await _add(store, first, now - 5_000)
    assert not await store.find_tombstone(LAYOUT, twin, now)
    assert await store.find_tombstone(LAYOUT, first, now)


async def test_strings_expire_after_their_last_record_stops_mattering(
    store: PairingStore,
) -> None:
    now = await redis_now_ms(store.client)
    digest = _digest(7)
    await _add(store, digest, now - 1_000)
    place = LAYOUT.place(digest, now - 1_000)
    key = store.keys.tombstones(place.group, place.window, place.bucket)
    assert await store.client.pexpiretime(key) == place.expire_at_ms
    assert place.expire_at_ms >= now - 1_000 + LAYOUT.tombstone_ms


async def test_a_claim_waiting_on_a_busy_code_that_expires_meanwhile_gets_code_expired(
    store: PairingStore,
) -> None:
    # A used-up code with a claim in flight makes the next claim ask again for up to
    # CLAIM_IN_FLIGHT_S (2 s). If the code expires meanwhile, the answer is CODE_EXPIRED:
    # each attempt reads the tombstone windows of its own moment (short windows here).
    layout = TombstoneLayout(tombstone_ms=3_000)  # 500 ms windows
    digest = _digest(4242)
    issued = await store.issue_code(digest, "r1", max_uses=1, ttl_s=2, first_char="A")
    assert issued is not None
    await store.call(store.tombstone_call(layout, digest, issued[1]))
    # The claims come 1 s before the code's deadline (Redis time): the second one's wait
    # for the first (up to 2 s) spans the expiry.
    await wait_redis_time(store.client, issued[1] - 1_000, "1 s before the code's deadline")
    await store.claim_code(digest, "app-a", "req-a", "s-a", layout)  # in flight, not settled
    with pytest.raises(CodeExpired):
        await store.claim_code(digest, "app-b", "req-b", "s-b", layout)
