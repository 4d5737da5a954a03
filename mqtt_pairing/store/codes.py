"""Codes: issue, tombstones, the runner's active code, claims of a code's uses.

See docs/protocol.md "Runner code" and "App pair", and mqtt_pairing/tombstones.py for the
records that answer CODE_EXPIRED.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from mqtt_pairing.codes import code_group
from mqtt_pairing.errors import (
    CodeAlreadyUsed,
    CodeExpired,
    CodeNotFound,
)
from mqtt_pairing.store.keys import MS_PER_S, KeySchema, session_keys_ttl_ms
from mqtt_pairing.store.transport import (
    ScriptCall,
    Transport,
)
from mqtt_pairing.tombstones import FINGERPRINT_HEX, TombstoneLayout

CLAIM_IN_FLIGHT_S = 2.0
"""How long a claimed use may still be given back by the pair that holds it (its session
refused); a claim on a used-up code waits that long at most before CODE_ALREADY_USED."""
_CLAIM_RETRY_S = 0.02


@dataclass(frozen=True, slots=True)
class Claim:
    """A use of a code taken for (app_id, request_id)."""

    runner_id: str
    session_id: str
    uses_left: int
    max_uses: int
    repeat: bool
    first_char: str


class ClaimBusy(Exception):
    """The code is used up but a recent claim may still be given back: ask again."""


CODES_SCRIPTS = (
    "issue_code",
    "add_tombstone",
    "find_tombstone",
    "set_runner_code",
    "clear_runner_code",
    "end_code",
    "claim_code",
    "unclaim_code",
    "settle_claim",
)
"""The Lua scripts (store/lua/) of this aggregate."""


@functools.lru_cache(maxsize=4096)
def _tombstone_keys(
    keys: KeySchema, group: str, bucket: int, start: int, stop: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The strings of a lookup and their windows (cached).

    Every claim carries them (a miss reads them in the same script, with one MGET), and
    they change only once a window.
    """
    windows = tuple(range(start, stop))
    return tuple(keys.tombstones(group, w, bucket) for w in windows), windows


class CodeStore(Transport):
    """Pairing codes in their own slots ({code:<digest>}) and the runner's active code."""

    # ---- codes ------------------------------------------------------------------------

    async def issue_code(
        self,
        digest: str,
        runner_id: str,
        *,
        max_uses: int,
        ttl_s: int,
        first_char: str,
    ) -> tuple[int, int] | None:
        """Create a code under `digest`; its hash lives `ttl_s` seconds.

        Returns:
            (created_ms, expires_ms), or None if the digest is taken (draw again).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "issue_code",
            [self.keys.code(digest)],
            [runner_id, max_uses, ttl_s * MS_PER_S, first_char],
        )
        if int(res[0]) != 1:
            return None
        return int(res[1]), int(res[2])

    def tombstone_call(self, layout: TombstoneLayout, digest: str, expires_ms: int) -> ScriptCall:
        """The `add_tombstone` call: the record that answers `CODE_EXPIRED` after expiry.

        Written with the code's issue (`mqtt_pairing.tombstones`); its result (the
        string's length, bytes) is of no use to the caller.
        """
        place = layout.place(digest, expires_ms)
        return ScriptCall(
            "add_tombstone",
            (self.keys.tombstones(place.group, place.window, place.bucket),),
            (place.fingerprint, place.offset, place.expire_at_ms),
        )

    def _tombstone_lookup(
        self, layout: TombstoneLayout, digest: str, now_ms: int
    ) -> tuple[tuple[str, ...], tuple[str | int, ...]]:
        """The KEYS and ARGV of a tombstone lookup (`tombstone_expired`, _prelude.lua).

        `now_ms` is this process's clock: which windows to read; the script decides with
        Redis time.
        """
        windows = layout.lookup_windows(now_ms)
        keys, names = _tombstone_keys(
            self.keys, code_group(digest), layout.bucket(digest), windows.start, windows.stop
        )
        return keys, (digest[FINGERPRINT_HEX], layout.window_ms, layout.tombstone_ms, *names)

    def find_tombstone_call(self, layout: TombstoneLayout, digest: str, now_ms: int) -> ScriptCall:
        """The `find_tombstone` call for a code whose hash may be gone; see `parse_tombstone`.

        (`claim_code` answers the same by itself; this is for tests and benchmarks.)
        """
        keys, args = self._tombstone_lookup(layout, digest, now_ms)
        return ScriptCall("find_tombstone", keys, args)

    @staticmethod
    def parse_tombstone(res: Any) -> bool:  # noqa: ANN401
        """True if the code expired within the tombstone time (`CODE_EXPIRED`)."""
        return int(res) == 1

    async def find_tombstone(self, layout: TombstoneLayout, digest: str, now_ms: int) -> bool:
        """True if the code of `digest` expired within the tombstone time.

        False when tombstones are off.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not layout.enabled:
            return False
        return self.parse_tombstone(
            await self.call(self.find_tombstone_call(layout, digest, now_ms))
        )

    def set_runner_code_call(
        self,
        runner_id: str,
        digest: str,
        *,
        expires_ms: int,
        code_ttl_s: int,
        idle_ttl_s: int,
        request_id: str,
        sealed_reply: str,
        dedupe_ttl_s: int,
        name: str | None,
        public_key: str | None,
        metadata: dict[str, Any] | None,
        max_uses: int = 1,
    ) -> ScriptCall:
        """The `set_runner_code` call: make `digest` the runner's active code.

        It also remembers the sealed reply; its result goes to `parse_set_runner_code`.
        `max_uses` is kept with it: the runner's slot counts the sessions opened with the
        code, which says whether a cancel found it live (`cancel_code`).
        """
        return ScriptCall(
            "set_runner_code",
            (
                self.keys.runner(runner_id),
                self.keys.dedupe("runner", runner_id, "code", request_id),
            ),
            (
                digest,
                expires_ms,
                # the runner hash holds the code until it expires, and its sessions' data
                session_keys_ttl_ms(max(idle_ttl_s, code_ttl_s)),
                sealed_reply,
                dedupe_ttl_s * MS_PER_S,
                name or "",
                public_key or "",
                json.dumps(metadata, separators=(",", ":")) if metadata is not None else "",
                max_uses,
            ),
        )

    @staticmethod
    def parse_set_runner_code(res: Any) -> str | None:  # noqa: ANN401
        """The digest of the code that `set_runner_code` replaced, or None."""
        return str(res) if res else None

    async def clear_runner_code(self, runner_id: str) -> tuple[str, bool | None] | None:
        """Forget the runner's active code.

        Returns:
            None if the runner had no active code, else (its digest, whether it was live:
            not expired and fewer sessions opened with it than its uses; None when the
            runner hash does not say, see `cancel_code`).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        old, live = await self._run("clear_runner_code", [self.keys.runner(runner_id)], [])
        if not old:
            return None
        return str(old), None if int(live) < 0 else int(live) == 1

    async def cancel_code(self, runner_id: str) -> bool:
        """Cancel the runner's active code (`cancel-code`, admin revoke); True if it was live.

        Two steps (docs/operations.md "cancel-code, admin codes revoke, runner ban"): the
        runner's slot forgets the code, then the code's slot marks it cancelled. The
        runner's slot decides the answer: a pair's session opens there only while the
        code is the runner's, so a pair racing the cancel either opened first (its use is
        spent: a single-use code was not live any more) or is refused after
        (CODE_ALREADY_USED, and its use is not counted), whatever the code's slot says of
        uses claimed but not yet given back. Exactly one of the two wins
        (docs/protocol.md "Other ops").

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        cleared = await self.clear_runner_code(runner_id)
        if cleared is None:
            return False
        digest, live = cleared
        ended = await self.end_code(digest, runner_id, "cancelled")
        return ended if live is None else live

    async def end_code(
        self, digest: str, runner_id: str, state: Literal["replaced", "cancelled"]
    ) -> bool:
        """Mark a code replaced or cancelled; True if it was live until now.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run("end_code", [self.keys.code(digest)], [state, runner_id])
        return int(res) == 1

    def claim_call(
        self,
        digest: str,
        app_id: str,
        request_id: str,
        session_id: str,
        tombstones: TombstoneLayout | None = None,
    ) -> ScriptCall:
        """The `claim_code` call; its result goes to `parse_claim`.

        With `tombstones` (enabled), a code whose hash is gone answers `CODE_EXPIRED` from
        its group's tombstone strings, in the same script.
        """
        keys: tuple[str, ...] = (self.keys.code(digest), self.keys.code_claims(digest))
        args: tuple[str | int, ...] = (
            f"{app_id}\n{request_id}",
            session_id,
            int(CLAIM_IN_FLIGHT_S * MS_PER_S),
        )
        if tombstones is not None and tombstones.enabled:
            t_keys, t_args = self._tombstone_lookup(tombstones, digest, int(time.time() * 1000))
            keys, args = keys + t_keys, args + t_args
        return ScriptCall("claim_code", keys, args)

    @staticmethod
    def parse_claim(res: Any) -> Claim:  # noqa: ANN401
        """The outcome of a `claim_code` call.

        Raises:
            CodeNotFound, CodeExpired, CodeAlreadyUsed: the lookup failed.
            ClaimBusy: used up, but a claim in flight may still be given back.
        """
        status = res[0]
        if status == "ok":
            return Claim(
                runner_id=res[1],
                session_id=res[2],
                uses_left=int(res[3]),
                max_uses=int(res[4]),
                repeat=bool(int(res[5])),
                first_char=res[6] or "?",
            )
        if status == "expired":
            raise CodeExpired
        if status == "used":
            raise CodeAlreadyUsed
        if status == "busy":
            raise ClaimBusy
        raise CodeNotFound

    async def claim_code(
        self,
        digest: str,
        app_id: str,
        request_id: str,
        session_id: str,
        tombstones: TombstoneLayout | None = None,
    ) -> Claim:
        """Take one use of the code for (app_id, request_id); a repeat returns the same.

        A used-up code with a claim in flight is asked again until that claim is settled
        (at most `CLAIM_IN_FLIGHT_S`).

        Raises:
            CodeNotFound, CodeExpired, CodeAlreadyUsed: the lookup failed.
            StoreUnavailable: Redis is unreachable.
        """
        deadline = asyncio.get_running_loop().time() + CLAIM_IN_FLIGHT_S
        while True:
            # Built anew each time: the tombstone windows follow the clock.
            call = self.claim_call(digest, app_id, request_id, session_id, tombstones)
            try:
                return self.parse_claim(await self.call(call))
            except ClaimBusy:
                if asyncio.get_running_loop().time() > deadline:
                    raise CodeAlreadyUsed from None
                await asyncio.sleep(_CLAIM_RETRY_S)

    def settle_claim_call(self, digest: str, app_id: str, request_id: str) -> ScriptCall:
        """The `settle_claim` call: the claimed use's session opened; it stays used."""
        return ScriptCall(
            "settle_claim", (self.keys.code_claims(digest),), (f"{app_id}\n{request_id}",)
        )

    def unclaim_call(self, digest: str, app_id: str, request_id: str) -> ScriptCall:
        """The `unclaim_code` call (gives back a use)."""
        return ScriptCall(
            "unclaim_code",
            (self.keys.code(digest), self.keys.code_claims(digest)),
            (f"{app_id}\n{request_id}",),
        )

    async def unclaim_code(self, digest: str, app_id: str, request_id: str) -> bool:
        """Give back the use taken for (app_id, request_id); True if one was given back.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "unclaim_code",
            [self.keys.code(digest), self.keys.code_claims(digest)],
            [f"{app_id}\n{request_id}"],
        )
        return int(res) == 1
