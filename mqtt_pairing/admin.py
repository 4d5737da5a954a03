"""AdminService: what the admin commands read and change in Redis (no MQTT, no CLI).

Everything here works on the same keys as the service (`store.keys`), so it needs only
`REDIS_URL` and `PAIRING_KEY_PREFIX`, never `PAIRING_SECRET`: codes are read by their
digest and shown masked (`codes.mask_code`).

Where the data is found (docs/design.md, "Redis keys"):

- bans, automatic penalties and the allowlist: the identity's `limit:{<kind>:<id>}` hash
  (ban_reason, ban_by, ban_at_ms, ban_until_ms; strikes, penalty_until_ms, penalty_ms;
  allow), changed through the store (`set_ban.lua`). Listed by SCAN (an admin command may
  walk the keyspace; the service never does).
- sessions: the runner's `runner:{runner:<id>}:sessions` hash; by app through the app's
  index; all of them through the expiry sets `expiry:{global:<n>}` (every open session
  is in one), so no SCAN. Reading does not refresh `last_seen_at`.
- codes: the runner hash names the active code's digest; all live codes by SCAN of the
  code hashes.
- history: `history:{runner:<id>}` / `history:{app:<id>}` for a query by identity (no
  scan of the whole history), else the global shards `history:{global:<n>}` merged
  newest first. Paging is by cursor: XREVRANGE from an exclusive id.

Revoking closes sessions in the runner's slot (`close_sessions`, which writes
`session.closed` to the runner's outbox) and marks the outbox due at once, so a running
service publishes it within `PAIRING_SWEEP_INTERVAL_S`; with no service running the
entries wait in the outbox, which every service drains when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pydantic import ValidationError
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mqtt_pairing.codes import mask_code
from mqtt_pairing.config import Settings
from mqtt_pairing.errors import InternalError, SessionNotFound, StoreUnavailable
from mqtt_pairing.models import ClosedReason, PairingHistoryEntry, PairingSession, format_ts
from mqtt_pairing.services.history import HISTORY_EVENTS, PairingHistoryService
from mqtt_pairing.store.keys import MS_PER_S, glob_escape, hash_tag
from mqtt_pairing.store.redis_store import UNAVAILABLE_RETRY_S, PairingStore

__all__ = [
    "BAN_TYPES",
    "AdminService",
    "BanEntry",
    "CodeInfo",
    "HistoryPage",
    "HistoryRecord",
    "Stats",
    "parse_cursor",
]

T = TypeVar("T")
Kind = Literal["runner", "app"]
BanType = Literal["ban", "penalty", "allowed"]

BAN_TYPES: tuple[BanType, ...] = ("ban", "penalty", "allowed")
"""What `list_bans` reports, in this order: admin bans, automatic penalties, allowlist."""

_SCAN_COUNT = 1000
_PIPELINE_CHUNK = 500
_HISTORY_BATCH_MAX = 1000
_CURSOR_RE = re.compile(r"^(\d{1,20})-(\d{1,20})(?:@(\d{1,4}))?$")
_MARK_A, _MARK_B = "\x01", "\x02"


def _pattern(template: str) -> str:
    """A SCAN pattern from a key built with the markers in place of its variable parts."""
    return glob_escape(template).replace(_MARK_A, "*").replace(_MARK_B, "*")


def _remaining_s(until_ms: int, now_ms: int) -> int:
    return max(0, -(-(until_ms - now_ms) // MS_PER_S))


def _int(value: Any, default: int = 0) -> int:  # noqa: ANN401 - a Redis reply field
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


@dataclass(frozen=True, slots=True)
class BanEntry:
    """One line of `bans list`: an admin ban, an automatic penalty or an allowlisted id.

    Attributes:
        type: "ban" (admin), "penalty" (automatic, from failed guesses) or "allowed".
        kind: "app" or "runner".
        id: the app_id or runner_id.
        reason: why (admin bans); None otherwise.
        by: who banned (admin bans); None otherwise.
        at_ms: when the ban or penalty started, ms; None for the allowlist.
        until_ms: when it ends, ms; None when permanent or for the allowlist.
        remaining_s: whole seconds left; None when permanent or for the allowlist.
        strikes: penalties in a row (automatic penalties); None otherwise.
    """

    type: BanType
    kind: Kind
    id: str
    reason: str | None = None
    by: str | None = None
    at_ms: int | None = None
    until_ms: int | None = None
    remaining_s: int | None = None
    strikes: int | None = None

    @property
    def permanent(self) -> bool:
        """An admin ban without an end."""
        return self.type == "ban" and self.until_ms is None

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (README.md, Administration): every key always present."""
        return {
            "type": self.type,
            "kind": self.kind,
            "id": self.id,
            "reason": self.reason,
            "by": self.by,
            "at": format_ts(self.at_ms) if self.at_ms is not None else None,
            "until": format_ts(self.until_ms) if self.until_ms is not None else None,
            "permanent": self.permanent,
            "remaining_s": self.remaining_s,
            "strikes": self.strikes,
        }


_LIMIT_FIELDS = [
    "ban_reason",
    "ban_by",
    "ban_at_ms",
    "ban_until_ms",
    "strikes",
    "penalty_until_ms",
    "penalty_ms",
    "allow",
]
"""The fields of an identity's limit hash that `bans` shows (store/lua/_prelude.lua)."""


def _limit_entries(kind: Kind, ident: str, row: Sequence[Any], now: int) -> list[BanEntry]:
    """The ban, penalty and allowlist entries in force in one HMGET of `_LIMIT_FIELDS`."""
    reason, by, at_ms, ban_until, strikes, p_until, p_ms, allowed = row
    out: list[BanEntry] = []
    until = _int(ban_until, -1)
    if ban_until is not None and (until < 0 or until > now):
        out.append(
            BanEntry(
                type="ban",
                kind=kind,
                id=ident,
                reason=reason or None,
                by=by or None,
                at_ms=_int(at_ms) or None,
                until_ms=until if until >= 0 else None,
                remaining_s=_remaining_s(until, now) if until >= 0 else None,
            )
        )
    if _int(p_until) > now:
        out.append(
            BanEntry(
                type="penalty",
                kind=kind,
                id=ident,
                reason="failed guesses",
                at_ms=_int(p_until) - _int(p_ms) if p_ms else None,
                until_ms=_int(p_until),
                remaining_s=_remaining_s(_int(p_until), now),
                strikes=_int(strikes),
            )
        )
    if allowed == "1":
        out.append(BanEntry(type="allowed", kind=kind, id=ident))
    return out


@dataclass(frozen=True, slots=True)
class CodeInfo:
    """A live pairing code as operators see it: masked, never in the clear."""

    runner_id: str
    masked: str
    max_uses: int
    uses_left: int
    created_at_ms: int
    expires_at_ms: int
    expires_in_s: int

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (README.md, Administration)."""
        return {
            "runner_id": self.runner_id,
            "code": self.masked,
            "max_uses": self.max_uses,
            "uses_left": self.uses_left,
            "created_at": format_ts(self.created_at_ms),
            "expires_at": format_ts(self.expires_at_ms),
            "expires_in_s": self.expires_in_s,
        }


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One history entry with where it was found.

    Attributes:
        stream_id: its id in the stream (`<ms>-<seq>`; the ms are the time).
        cursor: what to pass as `before` to get the entries older than this one.
        entry: the record (at_ms from the stream id).
    """

    stream_id: str
    cursor: str
    entry: PairingHistoryEntry

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (README.md, Administration): every key always present."""
        e = self.entry
        return {
            "id": self.stream_id,
            "cursor": self.cursor,
            "at": format_ts(e.at_ms),
            "event": e.event,
            "runner_id": e.runner_id,
            "app_id": e.app_id,
            "session_id": e.session_id,
            "code": e.code_mask,
            "error_code": e.error_code.value if e.error_code is not None else None,
            "detail": e.detail,
        }


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A page of history, newest first; `next_cursor` is None when nothing older is left."""

    records: list[HistoryRecord]
    next_cursor: str | None


@dataclass(slots=True)
class Stats:
    """What happened in a window (from the history) and what holds now."""

    window_s: int
    from_ms: int
    to_ms: int
    events: Counter[str] = field(default_factory=Counter)
    failed_by_code: Counter[str] = field(default_factory=Counter)
    active_sessions: int = 0
    live_codes: int = 0
    active_bans: int = 0
    active_penalties: int = 0
    allowlisted: int = 0
    budget_in_use: int = 0
    budget_limit: int = 0
    budget_window_s: int = 0

    def to_json(self) -> dict[str, Any]:
        """The `--json` object (README.md, Administration)."""
        return {
            "window_s": self.window_s,
            "from": format_ts(self.from_ms),
            "to": format_ts(self.to_ms),
            "pairs_succeeded": self.events["pair.succeeded"],
            "pairs_failed": self.events["pair.failed"],
            "pairs_failed_by_code": dict(sorted(self.failed_by_code.items())),
            "codes_issued": self.events["code.issued"],
            "bans_added": self.events["ban.added"],
            "penalties": self.events["penalty"],
            "sessions_closed": self.events["session.closed"],
            "active_sessions": self.active_sessions,
            "live_codes": self.live_codes,
            "active_bans": self.active_bans,
            "active_penalties": self.active_penalties,
            "allowlisted": self.allowlisted,
            "global_failure_budget": {
                "in_use": self.budget_in_use,
                "limit": self.budget_limit,
                "window_s": self.budget_window_s,
            },
        }


@dataclass(frozen=True, slots=True)
class _Position:
    ms: int
    seq: int
    shard: int | None


def parse_cursor(text: str) -> tuple[int, int, int | None]:
    """Parse a history cursor: `<ms>-<seq>` or `<ms>-<seq>@<shard>`.

    Raises:
        ValueError: not a cursor.
    """
    m = _CURSOR_RE.fullmatch(text)
    if m is None:
        raise ValueError("not a history cursor (an `id` or `cursor` from an earlier page)")
    shard = int(m.group(3)) if m.group(3) is not None else None
    return int(m.group(1)), int(m.group(2)), shard


@dataclass(slots=True)
class _StreamReader:
    """Reads one history stream backwards in batches (XREVRANGE, exclusive paging)."""

    admin: AdminService
    key: str
    shard: int | None
    upper: str
    lower: str
    batch: int
    buf: deque[tuple[tuple[int, int, int], str, dict[str, str]]] = field(default_factory=deque)
    done: bool = False

    async def fill(self, want: int | None = None) -> None:
        """Read the next batch, of at most `want` entries when the caller knows its need."""
        if self.buf or self.done:
            return
        count = self.batch if want is None else max(1, min(self.batch, want))
        raw: Any = await self.admin.guard(
            self.admin.client.xrevrange(self.key, max=self.upper, min=self.lower, count=count)
        )
        raw = raw or []
        if len(raw) < count:
            self.done = True
        for stream_id, fields in raw:
            ms, _, seq = str(stream_id).partition("-")
            order = (int(ms), int(seq or 0), self.shard or 0)
            self.buf.append((order, str(stream_id), dict(fields)))
        if raw:
            self.upper = "(" + str(raw[-1][0])


class AdminService:
    """The admin operations over the service's Redis.

    Args:
        store: the Redis store (its client and key schema).
        settings: key prefix, shards, history retention, limits.
        actor: who is acting, recorded as `by` in bans and history details.
    """

    def __init__(self, store: PairingStore, settings: Settings, *, actor: str = "admin") -> None:
        self.store = store
        self.client = store.client
        self.keys = store.keys
        self.settings = settings
        self.actor = actor
        self.history_service = PairingHistoryService(store, settings)

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await a Redis call, turning Redis errors into domain errors.

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: Redis refused the command or the credentials (the message names
                the error class).
        """
        try:
            return await awaitable
        except (AuthenticationError, AuthorizationError) as exc:
            raise InternalError(
                f"Redis refused the credentials ({type(exc).__name__}): check REDIS_URL "
                "or REDIS_PASSWORD"
            ) from None
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisClusterException):
            raise StoreUnavailable(retry_after_s=UNAVAILABLE_RETRY_S) from None
        except RedisError as exc:
            raise InternalError(f"Redis error: {type(exc).__name__}") from None

    async def now_ms(self) -> int:
        """Redis time, ms (docs/design.md: time comes from Redis, never from the host clock).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        secs, micros = await self.guard(self.client.time())
        return int(secs) * MS_PER_S + int(micros) // MS_PER_S

    async def _scan(self, pattern: str) -> list[str]:
        async def collect() -> list[str]:
            return [
                str(key) async for key in self.client.scan_iter(match=pattern, count=_SCAN_COUNT)
            ]

        return await self.guard(collect())

    async def _pipelined(
        self, calls: Sequence[Any], build: Callable[[Any, Any], object]
    ) -> list[Any]:
        """Run `build(pipe, item)` for every item, in pipelines of bounded size."""
        out: list[Any] = []
        for start in range(0, len(calls), _PIPELINE_CHUNK):
            pipe = self.client.pipeline(transaction=False)
            for item in calls[start : start + _PIPELINE_CHUNK]:
                build(pipe, item)
            out.extend(await self.guard(pipe.execute()))
        return out

    async def _record(self, *entries: PairingHistoryEntry) -> None:
        await self.history_service.record(entries)

    @staticmethod
    def _identity(kind: Kind, ident: str) -> dict[str, str]:
        return {"runner_id": ident} if kind == "runner" else {"app_id": ident}

    # ---- bans, penalties, allowlist ---------------------------------------------------

    def _tagged(self, keys: Iterable[str]) -> list[tuple[str, Kind, str]]:
        out: list[tuple[str, Kind, str]] = []
        for key in keys:
            kind, _, ident = hash_tag(key).partition(":")
            if kind in ("app", "runner") and ident:
                out.append((key, "app" if kind == "app" else "runner", ident))
        return out

    async def list_bans(self) -> list[BanEntry]:
        """Admin bans in force, automatic penalties in force, and the allowlist.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        now = await self.now_ms()
        k = self.keys
        limit_keys = self._tagged(await self._scan(_pattern(k.limit(_MARK_A, _MARK_B))))
        rows = await self._pipelined(limit_keys, lambda p, t: p.hmget(t[0], _LIMIT_FIELDS))
        out: list[BanEntry] = []
        for (_, kind, ident), row in zip(limit_keys, rows, strict=True):
            out.extend(_limit_entries(kind, ident, row, now))
        order = {t: i for i, t in enumerate(BAN_TYPES)}
        return sorted(out, key=lambda b: (order[b.type], b.kind, b.id))

    async def get_ban(self, kind: Kind, ident: str) -> BanEntry | None:
        """The admin ban in force on one app or runner, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return next(
            (
                b
                for b in await self._entries_of(kind, ident)
                if b.type == "ban" and b.kind == kind and b.id == ident
            ),
            None,
        )

    async def _entries_of(self, kind: Kind, ident: str) -> list[BanEntry]:
        now = await self.now_ms()
        row = await self.guard(self.client.hmget(self.keys.limit(kind, ident), _LIMIT_FIELDS))
        return _limit_entries(kind, ident, row, now)

    async def add_ban(
        self, kind: Kind, ident: str, *, duration_s: int | None, reason: str
    ) -> tuple[BanEntry, bool]:
        """Ban an app or runner (None: permanent); it takes effect on its next request.

        Banning a runner also cancels its active code (the store does it). Recorded in the
        history as `ban.added` (and `code.cancelled` when a code was cancelled).

        Returns:
            (the ban in force, whether it replaced an earlier ban).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        earlier = await self.get_ban(kind, ident)
        had_code = False
        if kind == "runner":
            had_code = bool(await self.guard(self.client.hexists(self.keys.runner(ident), "code")))
        await self.store.set_ban(kind, ident, reason=reason, by=self.actor, duration_s=duration_s)
        length = "permanent" if duration_s is None else f"{duration_s}s"
        records = [
            PairingHistoryEntry(
                event="ban.added",
                at_ms=0,
                detail=f"by={self.actor} for={length} reason={reason}",
                **self._identity(kind, ident),
            )
        ]
        if had_code:
            records.append(
                PairingHistoryEntry(
                    event="code.cancelled",
                    at_ms=0,
                    runner_id=ident,
                    detail=f"by={self.actor} (runner banned)",
                )
            )
        await self._record(*records)
        ban = await self.get_ban(kind, ident)
        if ban is None:  # a ban of a length that already ran out (not possible from the CLI)
            now = await self.now_ms()
            ban = BanEntry(type="ban", kind=kind, id=ident, reason=reason, by=self.actor, at_ms=now)
        return ban, earlier is not None

    async def remove_ban(self, kind: Kind, ident: str) -> tuple[bool, bool]:
        """Lift the admin ban and the automatic penalty of an app or runner.

        Lifting a penalty also forgets the strikes and the failed guesses in the window,
        so the next penalty starts again at `PAIRING_PENALTY_S`. Recorded in the history
        as `ban.removed` when anything was lifted.

        Returns:
            (an admin ban was lifted, a penalty was lifted).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        had_ban, had_penalty = await self.store.lift_ban(kind, ident, penalty=True)
        if had_ban or had_penalty:
            lifted = ",".join(
                name for name, did in (("ban", had_ban), ("penalty", had_penalty)) if did
            )
            await self._record(
                PairingHistoryEntry(
                    event="ban.removed",
                    at_ms=0,
                    detail=f"by={self.actor} lifted={lifted}",
                    **self._identity(kind, ident),
                )
            )
        return had_ban, had_penalty

    async def set_allowed(self, kind: Kind, ident: str, allowed: bool) -> bool:
        """Put an id on the allowlist (no automatic penalties) or take it off.

        Returns:
            Whether anything changed.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not await self.store.set_allowed(kind, ident, allowed):
            return False
        await self._record(
            PairingHistoryEntry(
                event="allow.added" if allowed else "allow.removed",
                at_ms=0,
                detail=f"by={self.actor}",
                **self._identity(kind, ident),
            )
        )
        return True

    # ---- sessions ---------------------------------------------------------------------

    async def _runner_sessions(self, runner_ids: Sequence[str]) -> list[PairingSession]:
        raw = await self._pipelined(runner_ids, lambda p, r: p.hvals(self.keys.runner_sessions(r)))
        out: list[PairingSession] = []
        for values in raw:
            for value in values or []:
                try:
                    out.append(PairingSession.model_validate_json(value))
                except ValidationError:
                    continue
        return out

    async def _session_runners(self) -> list[str]:
        """Runner ids with open sessions, from the expiry sets (every session is in one)."""

        async def collect() -> set[str]:
            found: set[str] = set()
            for shard in range(self.settings.pairing_index_shards):
                key = self.keys.expiry(shard)
                async for member, _score in self.client.zscan_iter(key, count=_SCAN_COUNT):
                    found.add(str(member).partition("\n")[0])
            return found

        return sorted(await self.guard(collect()))

    async def list_sessions(
        self, *, runner_id: str | None = None, app_id: str | None = None
    ) -> list[PairingSession]:
        """Active sessions of a runner, of an app, of both together, or all.

        Read only: listing here does not refresh `last_seen_at`.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if runner_id is not None:
            runners = [runner_id]
        elif app_id is not None:
            index = await self.guard(self.client.hvals(self.keys.app_sessions(app_id)))
            runners = sorted({str(r) for r in index})
        else:
            runners = await self._session_runners()
        found = await self._runner_sessions(runners)
        if app_id is not None:
            found = [s for s in found if s.app_id == app_id]
        return sorted(found, key=lambda s: (s.created_at_ms, s.session_id))

    async def _due_now(self, runner_id: str) -> None:
        await self.store.mark_outbox_due(
            runner_id, delay_s=0, shards=self.settings.pairing_index_shards
        )

    async def revoke_session(self, session_id: str) -> PairingSession:
        """Close one session with `closed_reason: "revoked"`; both parties are told.

        Raises:
            SessionNotFound: no active session with this id.
            StoreUnavailable: Redis is unreachable.
        """
        found = await self.store.find_session(session_id)
        if found is None:
            raise SessionNotFound
        runner_id, _app_id = found
        closed, _outbox = await self.store.close_sessions(
            runner_id, session_id=session_id, reason=ClosedReason.REVOKED
        )
        if not closed:
            raise SessionNotFound
        await self._due_now(runner_id)
        return closed[0]

    async def revoke_runner_sessions(self, runner_id: str) -> list[PairingSession]:
        """Close every session of a runner with `closed_reason: "revoked"`.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        closed, _outbox = await self.store.close_sessions(runner_id, reason=ClosedReason.REVOKED)
        if closed:
            await self._due_now(runner_id)
        return closed

    # ---- codes ------------------------------------------------------------------------

    async def _code_infos(
        self, digests: Sequence[tuple[str, str | None]], now: int
    ) -> list[CodeInfo]:
        fields = ["r", "s", "m", "u", "c", "e", "f"]  # names: store/lua/issue_code.lua
        raw = await self._pipelined(digests, lambda p, d: p.hmget(self.keys.code(d[0]), fields))
        out: list[CodeInfo] = []
        for (digest, owner), values in zip(digests, raw, strict=True):
            runner_id, state, max_uses, uses_left, created, expires, first = values
            if runner_id is None or state != "active" or _int(expires) <= now:
                continue
            if owner is not None and runner_id != owner:
                continue
            try:
                masked = mask_code(first or "", digest)
            except ValueError:
                continue
            out.append(
                CodeInfo(
                    runner_id=str(runner_id),
                    masked=masked,
                    max_uses=_int(max_uses),
                    uses_left=_int(uses_left),
                    created_at_ms=_int(created),
                    expires_at_ms=_int(expires),
                    expires_in_s=_remaining_s(_int(expires), now),
                )
            )
        return sorted(out, key=lambda c: (c.runner_id, c.expires_at_ms))

    async def list_codes(self, *, runner_id: str | None = None) -> list[CodeInfo]:
        """Live codes (active, not expired, uses left), masked; of one runner or all.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        now = await self.now_ms()
        if runner_id is not None:
            digest = await self.guard(self.client.hget(self.keys.runner(runner_id), "code"))
            if not digest:
                return []
            return await self._code_infos([(str(digest), runner_id)], now)
        keys = await self._scan(self.keys.code_pattern())
        digests: list[tuple[str, str | None]] = []
        for key in keys:
            digest = self.keys.digest_of(key)
            if digest is not None:
                digests.append((digest, None))
        return await self._code_infos(digests, now)

    async def revoke_code(self, runner_id: str) -> bool:
        """Cancel the runner's active code (it answers CODE_ALREADY_USED from then on).

        Returns:
            True if a live code was cancelled.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        live = await self.store.cancel_code(runner_id)
        if live:
            await self._record(
                PairingHistoryEntry(
                    event="code.cancelled",
                    at_ms=0,
                    runner_id=runner_id,
                    detail=f"by={self.actor}",
                )
            )
        return live

    # ---- history ----------------------------------------------------------------------

    def _history_streams(
        self, runner_id: str | None, app_id: str | None
    ) -> list[tuple[str, int | None]]:
        if app_id is not None:
            return [(self.keys.history("app", app_id), None)]
        if runner_id is not None:
            return [(self.keys.history("runner", runner_id), None)]
        shards = self.settings.pairing_index_shards
        if shards == 1:
            return [(self.keys.history_global(0), None)]
        return [(self.keys.history_global(n), n) for n in range(shards)]

    @staticmethod
    def _record_of(
        order: tuple[int, int, int], stream_id: str, fields: dict[str, str], shard: int | None
    ) -> HistoryRecord:
        data: dict[str, Any] = {
            name: fields[name]
            for name in ("event", "runner_id", "app_id", "session_id", "code_mask", "detail")
            if fields.get(name)
        }
        data.setdefault("event", "?")
        try:
            entry = PairingHistoryEntry(
                at_ms=order[0], error_code=fields.get("error_code") or None, **data
            )
        except ValidationError:
            entry = PairingHistoryEntry(at_ms=order[0], **data)
        cursor = stream_id if shard is None else f"{stream_id}@{shard}"
        return HistoryRecord(stream_id=stream_id, cursor=cursor, entry=entry)

    def _readers(
        self,
        streams: Sequence[tuple[str, int | None]],
        *,
        since_ms: int | None,
        until_ms: int | None,
        before: str | None,
        batch: int,
    ) -> list[_StreamReader]:
        pos: _Position | None = None
        if before is not None:
            ms, seq, shard = parse_cursor(before)
            pos = _Position(ms, seq, shard)
        lower = str(since_ms) if since_ms is not None else "-"
        readers: list[_StreamReader] = []
        for key, shard in streams:
            upper = str(until_ms) if until_ms is not None else "+"
            if pos is not None and (until_ms is None or pos.ms <= until_ms):
                # Entries are ordered by (id, shard): with a tie on the id, the shards
                # below the cursor's still hold entries older than it.
                inclusive = pos.shard is not None and shard is not None and shard < pos.shard
                upper = ("" if inclusive else "(") + f"{pos.ms}-{pos.seq}"
            readers.append(_StreamReader(self, key, shard, upper, lower, batch))
        return readers

    async def _merged(
        self, readers: Sequence[_StreamReader], want: Callable[[], int | None]
    ) -> AsyncGenerator[HistoryRecord, None]:
        """Entries of all readers, newest first by (id, shard); `want()`: entries still needed."""
        while True:
            empty = [r for r in readers if not r.buf and not r.done]
            if empty:
                need = want()
                await asyncio.gather(*(r.fill(need) for r in empty))
            heads = [r for r in readers if r.buf]
            if not heads:
                return
            best = max(heads, key=lambda r: r.buf[0][0])
            order, stream_id, fields = best.buf.popleft()
            yield self._record_of(order, stream_id, fields, best.shard)

    async def history(
        self,
        *,
        runner_id: str | None = None,
        app_id: str | None = None,
        events: Sequence[str] = (),
        since_ms: int | None = None,
        until_ms: int | None = None,
        before: str | None = None,
        limit: int = 50,
    ) -> HistoryPage:
        """History entries, newest first, with filters; one page of at most `limit`.

        A query by runner or app reads only that identity's stream (both: the app's,
        filtered by runner). `before` is the `cursor` of the last entry of the previous
        page (exclusive); `since_ms`/`until_ms` are inclusive bounds.

        Raises:
            ValueError: `before` is not a cursor, or an event is unknown.
            StoreUnavailable: Redis is unreachable.
        """
        unknown = [e for e in events if e not in HISTORY_EVENTS]
        if unknown:
            raise ValueError(f"unknown event type {unknown[0]!r}")
        if before is not None:
            parse_cursor(before)
        wanted = set(events)
        batch = min(max(limit + 1, 100), _HISTORY_BATCH_MAX)
        # Records older than the retention are trimmed off the request path (a sample of
        # writes, the sweep), so some may still be stored: never shown.
        oldest = await self.now_ms() - self.settings.pairing_history_retention_s * MS_PER_S
        since_ms = oldest if since_ms is None else max(since_ms, oldest)
        readers = self._readers(
            self._history_streams(runner_id, app_id),
            since_ms=since_ms,
            until_ms=until_ms,
            before=before,
            batch=batch,
        )
        records: list[HistoryRecord] = []
        more = False
        filtered = bool(wanted) or (runner_id is not None and app_id is not None)

        def still_needed() -> int | None:
            # One more than the page, to know whether there is a next page; unknown when
            # filtering (how many of a batch match is not known in advance).
            return None if filtered else limit + 1 - len(records)

        async with contextlib.aclosing(self._merged(readers, still_needed)) as merged:
            async for record in merged:
                e = record.entry
                if wanted and e.event not in wanted:
                    continue
                if runner_id is not None and app_id is not None and e.runner_id != runner_id:
                    continue
                if len(records) == limit:
                    more = True
                    break
                records.append(record)
        return HistoryPage(records, records[-1].cursor if more and records else None)

    # ---- stats ------------------------------------------------------------------------

    async def stats(self, window_s: int) -> Stats:
        """Counts over the last `window_s` seconds (from the history) and current state.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        now = await self.now_ms()
        s = self.settings
        since = now - min(window_s, s.pairing_history_retention_s) * MS_PER_S
        out = Stats(window_s=window_s, from_ms=since, to_ms=now)
        streams = [(self.keys.history_global(n), n) for n in range(s.pairing_index_shards)]
        readers = [
            _StreamReader(self, key, shard, str(now), str(since), _HISTORY_BATCH_MAX)
            for key, shard in streams
        ]
        for reader in readers:
            while not reader.done:
                await reader.fill()
                while reader.buf:
                    _order, _sid, fields = reader.buf.popleft()
                    event = fields.get("event", "?")
                    out.events[event] += 1
                    if event == "pair.failed":
                        out.failed_by_code[fields.get("error_code") or "?"] += 1
        runners = await self._session_runners()
        counts = await self._pipelined(runners, lambda p, r: p.hlen(self.keys.runner_sessions(r)))
        out.active_sessions = sum(int(c) for c in counts)
        out.live_codes = len(await self.list_codes())
        for ban in await self.list_bans():
            if ban.type == "ban":
                out.active_bans += 1
            elif ban.type == "penalty":
                out.active_penalties += 1
            else:
                out.allowlisted += 1
        shards = s.pairing_global_fail_shards
        window_ms = s.pairing_global_fail_window_s * MS_PER_S
        pipe = self.client.pipeline(transaction=False)
        for shard in range(shards):
            pipe.zcount(self.keys.budget(shard), f"({now - window_ms}", "+inf")
        out.budget_in_use = sum(int(n) for n in await self.guard(pipe.execute()))
        out.budget_limit = max(1, s.pairing_global_fail_limit // shards) * shards
        out.budget_window_s = s.pairing_global_fail_window_s
        return out
