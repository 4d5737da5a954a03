"""Tombstones of codes: where an expired code is remembered, and in what form (pure logic).

docs/protocol.md "Codes": an expired code answers `CODE_EXPIRED` for `PAIRING_CODE_TOMBSTONE_S`
after its expiry, then `CODE_NOT_FOUND`. A code's own hash lives only until the code
expires. What remains after that is a 6-byte record, written when the code is issued:

- bytes 0-4: digest bytes 1-5 (hex characters 2-11 of `codes.code_digest`), 40 bits;
- byte 5: the expiry, as a fraction of the window (1/256 of it).

Records are appended to strings shared by every code of one group (digest byte 0,
`codes.code_group`) whose expiry falls in one window; a window is
1/`WINDOWS_PER_TOMBSTONE` of the tombstone time, and each string expires when the last
record in it stops mattering. Per live code this costs about 6 bytes for every `window` of
its TTL + tombstone + half a window (strings are rewritten whole, at their exact size:
`APPEND` would preallocate up to as much again), in place of a whole code hash (about 240
bytes) kept for the tombstone time; `scripts/bench` measures the whole.

A lookup reads the strings of the digest's group for the windows that can hold an
expiry in [now - tombstone, now] and answers "expired" if a record with the digest's 48
bits has an expiry in that range. It runs inside `claim_code.lua`, and only when the
code's hash is gone: the strings share the tag `{c:<group>}` with the group's code
hashes, so a successful pair never reads them and a failed guess reads them in the same
script as its claim. Another code with the same 40 bits in the same group would answer
`CODE_EXPIRED` in place of `CODE_NOT_FOUND`: with n records scanned the chance is
n / 2^40 per guess (about 5e-9 for the ~6,000 records a miss reads among a million live
codes' tombstones), and both count as a failed guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqtt_pairing.codes import code_group

WINDOWS_PER_TOMBSTONE = 6
"""A window is this fraction of the tombstone time: more windows, less time kept past it."""
RECORD_BYTES = 6
FINGERPRINT_HEX = slice(2, 12)
"""Hex characters of the digest kept in a record (40 bits, after the group's 8)."""
BUCKETS = 4
"""Strings per group and window, by the top 2 bits of the fingerprint: a failed guess reads
a quarter of its group's records (what a lookup reads is what it costs Redis, about
1.5 ns a byte), for a few more keys (about 6 bytes per live code at 100k codes)."""
OFFSET_STEPS = 256
KEEP_MARGIN_MS = 1_000
"""Kept this much longer than needed, so a record never expires before it is read."""


@dataclass(frozen=True, slots=True)
class TombstonePlace:
    """Where a code's record goes and what it holds.

    `group`, `window` and `bucket` name the string (`KeySchema.tombstones`), `fingerprint` is 10 hex
    characters, `offset` the expiry within the window in 1/256 steps, and
    `expire_at_ms` the string's expiry (ms since the epoch).
    """

    group: str
    window: int
    bucket: int
    fingerprint: str
    offset: int
    expire_at_ms: int


@dataclass(frozen=True, slots=True)
class TombstoneLayout:
    """The window arithmetic of tombstones for one setting of them.

    Args:
        tombstone_ms: how long after its expiry a code answers `CODE_EXPIRED`
            (`PAIRING_CODE_TOMBSTONE_S` x 1,000); 0 turns tombstones off. Every instance
            must use the same setting, or lookups miss records (`CODE_NOT_FOUND`).
    """

    tombstone_ms: int

    @property
    def enabled(self) -> bool:
        """False when the tombstone time is 0: nothing is written or looked up."""
        return self.tombstone_ms > 0

    @property
    def window_ms(self) -> int:
        """The width of a window, ms: tombstone time / `WINDOWS_PER_TOMBSTONE`, rounded up."""
        return max(1, -(-self.tombstone_ms // WINDOWS_PER_TOMBSTONE))

    @staticmethod
    def bucket(digest: str) -> int:
        """The string of its group and window that holds a code's record (0 to 3)."""
        return int(digest[FINGERPRINT_HEX.start], 16) * BUCKETS // 16

    def place(self, digest: str, expires_ms: int) -> TombstonePlace:
        """Where the record of a code that expires at `expires_ms` (Redis time) goes.

        Raises:
            ValueError: `digest` is not hex.
        """
        w = self.window_ms
        window = expires_ms // w
        within = expires_ms - window * w
        offset = within * OFFSET_STEPS // w
        return TombstonePlace(
            group=code_group(digest),
            bucket=self.bucket(digest),
            window=window,
            fingerprint=digest[FINGERPRINT_HEX],
            offset=offset,
            expire_at_ms=(window + 1) * w + self.tombstone_ms + KEEP_MARGIN_MS,
        )

    def expiry_of(self, window: int, offset: int) -> int:
        """The expiry a record stands for (ms since the epoch).

        At most 1/256 of a window (+ 1 ms) before the true one, never after it, so the
        answer turns to `CODE_NOT_FOUND` that much early (2.3 s of an hour by default).
        The same arithmetic as `find_tombstone.lua`.
        """
        w = self.window_ms
        return window * w + offset * w // OFFSET_STEPS

    def lookup_windows(self, now_ms: int, skew_ms: int = 1_000) -> range:
        """The windows whose strings can hold an expiry in [now - tombstone, now].

        `now_ms` is this process's clock; the lookup itself decides with Redis time, so
        the range is widened by `skew_ms` (and a window) on both sides.
        """
        w = self.window_ms
        skew = max(skew_ms, w)
        return range((now_ms - self.tombstone_ms - skew) // w, (now_ms + skew) // w + 1)

    def answers_expired(self, now_ms: int, expires_ms: int) -> bool:
        """Whether a code that expired at `expires_ms` answers `CODE_EXPIRED` at `now_ms`."""
        return expires_ms <= now_ms < expires_ms + self.tombstone_ms
