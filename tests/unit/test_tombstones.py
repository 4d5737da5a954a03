"""Tests of mqtt_pairing.tombstones: the window, shard and record arithmetic (pure)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from mqtt_pairing.codes import code_digest, code_group, generate_code
from mqtt_pairing.tombstones import (
    BUCKETS,
    KEEP_MARGIN_MS,
    OFFSET_STEPS,
    WINDOWS_PER_TOMBSTONE,
    TombstoneLayout,
)

digests = st.binary(min_size=12, max_size=12).map(bytes.hex)
layouts = st.builds(
    TombstoneLayout, tombstone_ms=st.integers(min_value=1, max_value=7 * 86_400_000)
)
times = st.integers(min_value=0, max_value=4_102_444_800_000)  # up to 2100, ms


def test_the_default_setting_gives_ten_minute_windows() -> None:
    layout = TombstoneLayout(tombstone_ms=3_600_000)
    assert layout.window_ms == 600_000
    assert len(layout.lookup_windows(1_800_000_000_000)) == 9  # 6 + 1 + a window each side


def test_a_zero_tombstone_turns_them_off() -> None:
    assert not TombstoneLayout(tombstone_ms=0).enabled
    assert TombstoneLayout(tombstone_ms=1).enabled


@given(layouts, digests, times)
def test_a_record_stands_for_its_expiry_or_a_step_before(
    layout: TombstoneLayout, digest: str, expires_ms: int
) -> None:
    place = layout.place(digest, expires_ms)
    assert 0 <= place.offset < OFFSET_STEPS
    assert place.group == digest[:2]
    assert place.fingerprint == digest[2:12]
    assert 0 <= place.bucket < BUCKETS
    decoded = layout.expiry_of(place.window, place.offset)
    step = layout.window_ms / OFFSET_STEPS
    assert expires_ms - step - 1 < decoded <= expires_ms


@given(layouts, digests, times)
def test_the_string_outlives_every_expiry_it_holds_by_the_tombstone(
    layout: TombstoneLayout, digest: str, expires_ms: int
) -> None:
    place = layout.place(digest, expires_ms)
    assert place.expire_at_ms >= expires_ms + layout.tombstone_ms + KEEP_MARGIN_MS
    # ... and not by much more than a window
    assert place.expire_at_ms <= expires_ms + layout.tombstone_ms + layout.window_ms + 1_000


@given(layouts, digests, times, st.integers(min_value=0, max_value=7 * 86_400_000))
def test_a_lookup_reads_the_window_of_every_expiry_that_still_answers(
    layout: TombstoneLayout, digest: str, now_ms: int, age_ms: int
) -> None:
    expires_ms = now_ms - age_ms
    if not layout.answers_expired(now_ms, expires_ms):
        return
    # even when this process's clock is up to a second off Redis's
    for skew in (-1_000, 0, 1_000):
        assert layout.place(digest, expires_ms).window in layout.lookup_windows(now_ms + skew)


@given(layouts)
def test_a_lookup_reads_a_bounded_number_of_strings(layout: TombstoneLayout) -> None:
    w = layout.window_ms
    bound = WINDOWS_PER_TOMBSTONE + 3 + 2 * (1_000 // w + 1)
    assert len(layout.lookup_windows(1_800_000_000_000)) <= bound


def test_codes_spread_over_the_groups() -> None:
    key = b"k" * 32
    groups = {code_group(code_digest(key, generate_code())) for _ in range(4096)}
    assert len(groups) == 256
    buckets = Counter(
        TombstoneLayout.bucket(code_digest(key, generate_code())) for _ in range(4096)
    )
    assert sorted(buckets) == list(range(BUCKETS))
    assert min(buckets.values()) > 4096 / BUCKETS / 2


@given(layouts, times, st.integers(min_value=-10_000_000, max_value=10_000_000))
def test_expired_answers_exactly_for_the_tombstone_time(
    layout: TombstoneLayout, expires_ms: int, delta_ms: int
) -> None:
    now = expires_ms + delta_ms
    assert layout.answers_expired(now, expires_ms) == (0 <= delta_ms < layout.tombstone_ms)
