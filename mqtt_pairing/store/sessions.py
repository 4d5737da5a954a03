"""Sessions: open, close, list, indexes, by-id lookup and the idle expiry sweep.

See docs/design.md "A pair across slots" and docs/operations.md
"`unpair` (app or runner), admin revoke, idle expiry".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mqtt_pairing.errors import (
    CodeAlreadyUsed,
    RunnerOffline,
    SessionLimitReached,
)
from mqtt_pairing.models import ClosedReason, PairingSession
from mqtt_pairing.store.keys import MS_PER_S, SESSION_KEYS_MARGIN_S, session_keys_ttl_ms
from mqtt_pairing.store.outbox import OutboxEntry, parse_outbox, parse_session
from mqtt_pairing.store.transport import (
    Call,
    RawCall,
    ScriptCall,
    Transport,
)


@dataclass(frozen=True, slots=True)
class OpenedSession:
    """A session opened (or found again) in the runner's slot."""

    session: PairingSession
    replaced: PairingSession | None
    runner_name: str | None
    runner_public_key: str | None
    runner_metadata: dict[str, Any] | None
    repeat: bool
    outbox: list[OutboxEntry]


SESSIONS_SCRIPTS = (
    "open_session",
    "close_sessions",
    "touch_sessions",
    "active_session",
    "expire_session",
)
"""The Lua scripts (store/lua/) of this aggregate."""


class SessionStore(Transport):
    """Sessions in the runner's slot, their indexes in other slots and their idle deadlines."""

    # ---- sessions ---------------------------------------------------------------------

    async def open_session(self, *, runner_id: str, **options: Any) -> OpenedSession:  # noqa: ANN401
        """Open the session of a claimed use in the runner's slot (see `open_call`).

        Raises:
            CodeAlreadyUsed: the code is no longer the runner's active code.
            RunnerOffline: the runner is known to be offline.
            SessionLimitReached: the runner has `max_sessions` active sessions.
            StoreUnavailable: Redis is unreachable.
        """
        call = self.open_call(runner_id=runner_id, **options)
        return self.parse_open(runner_id, await self.call(call))

    def open_call(
        self,
        *,
        digest: str,
        session_id: str,
        runner_id: str,
        app_id: str,
        app_name: str | None,
        idle_ttl_s: int,
        max_sessions: int,
        uses_left: int = 0,
        app_public_key: str | None = None,
        app_metadata: dict[str, Any] | None = None,
        code_mask: str = "",
        history_max_len: int = 10_000,
        history_retention_s: int = 30 * 86_400,
        now_ms: int | None = None,
    ) -> ScriptCall:
        """The `open_session` call; its result goes to `parse_open`.

        The script also writes the pair's record (`pair.succeeded`, with `code_mask`) to
        the runner's history stream, kept to about `history_max_len` records and expiring
        when idle for `history_retention_s`; the global and app records are the caller's
        (`PairingHistoryService.calls` with `streams=("global", "app")`). Its one outbox
        entry, `session.opened`, carries `uses_left` (the relay renders `code.used` from
        it) and `code_mask`. `now_ms`: a Redis time read earlier in the same request (the
        session's created_at), to save the script its TIME; None reads it.
        """
        extra = {
            "app_public_key": app_public_key,
            "app_metadata": app_metadata,
            "uses_left": uses_left,
            "code_mask": code_mask,
        }
        return ScriptCall(
            "open_session",
            (
                self.keys.runner(runner_id),
                self.keys.runner_sessions(runner_id),
                self.keys.outbox(runner_id),
                self.keys.history("runner", runner_id),
            ),
            (
                digest,
                session_id,
                runner_id,
                app_id,
                app_name or "",
                session_keys_ttl_ms(idle_ttl_s),
                max_sessions,
                json.dumps(extra),
                code_mask,
                history_max_len,
                history_retention_s * MS_PER_S,
                "" if now_ms is None else now_ms,
            ),
        )

    @staticmethod
    def parse_open(runner_id: str, res: Any) -> OpenedSession:  # noqa: ANN401
        """The outcome of an `open_session` call.

        Raises:
            CodeAlreadyUsed: the code is no longer the runner's active code.
            RunnerOffline: the runner is known to be offline.
            SessionLimitReached: the runner has `max_sessions` active sessions.
        """
        status = res[0]
        if status == "ok":
            return OpenedSession(
                session=parse_session(res[1]),
                replaced=parse_session(res[2]) if res[2] else None,
                runner_name=res[3] or None,
                runner_public_key=res[4] or None,
                runner_metadata=json.loads(res[5]) if res[5] else None,
                repeat=bool(int(res[6])),
                outbox=parse_outbox(runner_id, res[7]),
            )
        if status == "offline":
            raise RunnerOffline
        if status == "limit":
            raise SessionLimitReached
        raise CodeAlreadyUsed

    async def close_sessions(
        self,
        runner_id: str,
        *,
        session_id: str | None = None,
        app_id: str | None = None,
        owner_app_id: str | None = None,
        reason: ClosedReason,
    ) -> tuple[list[PairingSession], list[OutboxEntry]]:
        """Close one session, all sessions with one app, or all sessions of a runner.

        Afterwards the app indexes and by-id lookups of the closed sessions are dropped
        (other slots; idempotent, so a crash in between leaves only stale index entries
        that listing cleans up).

        Args:
            runner_id: the runner whose sessions to close.
            session_id: close only this session.
            app_id: close only the sessions with this app.
            owner_app_id: the session must belong to this app (an app closes its own only).
            reason: the closed_reason.

        Returns:
            The closed sessions (state closed, closed_reason set), and the outbox entries
            this call wrote (their session.closed events; not what others wrote there).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if session_id is not None:
            mode, value = "session", session_id
        elif app_id is not None:
            mode, value = "app", app_id
        else:
            mode, value = "all", ""
        res = await self._run(
            "close_sessions",
            [self.keys.runner_sessions(runner_id), self.keys.outbox(runner_id)],
            [mode, value, owner_app_id or "", reason.value],
        )
        closed = [parse_session(raw) for raw in res[0]]
        await self.drop_session_indexes(closed)
        return closed, parse_outbox(runner_id, res[1])

    async def drop_session_indexes(self, sessions: Sequence[PairingSession]) -> None:
        """Remove closed sessions from their apps' indexes and the by-id lookup.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.batch(self.drop_index_calls(sessions))

    def drop_index_calls(self, sessions: Sequence[PairingSession]) -> list[Call]:
        """The calls that drop closed sessions from their apps' indexes and by-id lookups."""
        return [c for s in sessions for c in self.drop_index_calls_by_id(s.session_id, s.app_id)]

    def drop_index_calls_by_id(self, session_id: str, app_id: str) -> list[Call]:
        """The calls that drop one session from its app's index and its by-id lookup."""
        return [
            RawCall(("HDEL", self.keys.app_sessions(app_id), session_id)),
            RawCall(("DEL", self.keys.session(session_id))),
        ]

    def by_id_call(
        self, session_id: str, runner_id: str, app_id: str, *, idle_ttl_s: int
    ) -> RawCall:
        """The SET of a session's by-id lookup (`session:{session:<id>}`), idle TTL (s)."""
        value = json.dumps({"runner_id": runner_id, "app_id": app_id})
        ttl_s = idle_ttl_s + SESSION_KEYS_MARGIN_S
        return RawCall(("SET", self.keys.session(session_id), value, "EX", ttl_s))

    def app_index_call(
        self, app_id: str, session_id: str, runner_id: str, *, idle_ttl_s: int
    ) -> ScriptCall:
        """Index one session under its app (`finish_request` in its `none` mode).

        The app's index hash (`app-sessions`, field session_id -> runner_id) gets the
        entry and the idle TTL (seconds) plus a margin; nothing else of the request is
        touched. A pair writes it before it opens the session, so that the app finds the
        session as soon as it has the reply; readers drop entries whose session is not
        open (`app_sessions`), so one left by a refused open is harmless.
        """
        k = self.keys
        return ScriptCall(
            "finish_request",
            # KEYS[1..3] are left alone in this mode: any keys of the app's tag do.
            (
                k.limit("app", app_id),
                k.limit("app", app_id),
                k.limit_failures("app", app_id),
                k.app_sessions(app_id),
            ),
            (
                "none",
                "",
                0,
                "",
                0,
                0,
                0,
                0,
                0,
                0,
                "",
                session_id,
                runner_id,
                "",
                session_keys_ttl_ms(idle_ttl_s),
            ),
        )

    async def find_session(self, session_id: str) -> tuple[str, str] | None:
        """(runner_id, app_id) of a session by id, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw = await self.call(RawCall(("GET", self.keys.session(session_id))))
        if raw is None:
            return None
        data = json.loads(raw)
        return str(data["runner_id"]), str(data["app_id"])

    async def app_session_runner(self, app_id: str, session_id: str) -> str | None:
        """The runner of one of the app's sessions, from the app's index, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        runner = await self.call(RawCall(("HGET", self.keys.app_sessions(app_id), session_id)))
        return str(runner) if runner is not None else None

    async def active_session(
        self, runner_id: str, session_id: str
    ) -> tuple[PairingSession | None, int]:
        """One active session of a runner (read only, nothing refreshed), and Redis time.

        Returns:
            (the session, or None if the runner has no such active session; now in ms).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw, now_ms = await self._run(
            "active_session", [self.keys.runner_sessions(runner_id)], [session_id]
        )
        return (parse_session(raw) if raw else None), int(now_ms)

    async def runner_sessions(
        self, runner_id: str, *, idle_ttl_s: int, app_id: str = ""
    ) -> list[PairingSession]:
        """Active sessions of a runner (optionally only with one app), refreshed.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "touch_sessions",
            [self.keys.runner_sessions(runner_id), self.keys.runner(runner_id)],
            [session_keys_ttl_ms(idle_ttl_s), app_id],
        )
        return sorted((parse_session(raw) for raw in res), key=lambda s: s.created_at_ms)

    async def app_sessions(self, app_id: str, *, idle_ttl_s: int) -> list[PairingSession]:
        """Active sessions of an app, refreshed; stale index entries are dropped.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        index: dict[str, str] = await self.call(
            RawCall(("HGETALL", self.keys.app_sessions(app_id)))
        )
        found: list[PairingSession] = []
        for runner_id in sorted(set(index.values())):
            found.extend(
                await self.runner_sessions(runner_id, idle_ttl_s=idle_ttl_s, app_id=app_id)
            )
        live = {s.session_id for s in found}
        stale = [sid for sid in index if sid not in live]
        if stale:
            await self.call(RawCall(("HDEL", self.keys.app_sessions(app_id), *stale)))
        if found:
            ttl_ms = session_keys_ttl_ms(idle_ttl_s)
            await self.call(RawCall(("PEXPIRE", self.keys.app_sessions(app_id), ttl_ms)))
        return sorted(found, key=lambda s: s.created_at_ms)

    def expiry_call(self, session: PairingSession, *, idle_ttl_s: int, shards: int) -> ScriptCall:
        """The `mark_due` call that puts a session in the expiry sets at its deadline."""
        member = f"{session.runner_id}\n{session.session_id}"
        key = self.keys.expiry(self.keys.shard_of(session.runner_id, shards))
        deadline = session.last_seen_at_ms + idle_ttl_s * MS_PER_S
        return ScriptCall("mark_due", (key,), (member, 0, deadline, 1))

    def expiry_call_by_id(
        self, runner_id: str, session_id: str, *, idle_ttl_s: int, shards: int
    ) -> ScriptCall:
        """The `mark_due` call of a session about to open: due `idle_ttl_s` from now.

        Written with the open (a refused open leaves an entry whose session does not
        exist, which the sweep drops); `expire_session` checks `last_seen_at` anyway.
        """
        member = f"{runner_id}\n{session_id}"
        key = self.keys.expiry(self.keys.shard_of(runner_id, shards))
        return ScriptCall("mark_due", (key,), (member, idle_ttl_s * MS_PER_S, "", 1))

    def unschedule_expiry_call(self, runner_id: str, session_id: str, *, shards: int) -> RawCall:
        """The `ZREM` of a session's idle deadline (a refused open's, see above)."""
        key = self.keys.expiry(self.keys.shard_of(runner_id, shards))
        return RawCall(("ZREM", key, f"{runner_id}\n{session_id}"))

    async def schedule_expiry(
        self, session: PairingSession, *, idle_ttl_s: int, shards: int
    ) -> None:
        """Put a session in the expiry sets with its idle deadline.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.call(self.expiry_call(session, idle_ttl_s=idle_ttl_s, shards=shards))

    async def claim_due_expiries(
        self, shard: int, *, limit: int, lease_s: float
    ) -> list[tuple[str, str]]:
        """(runner_id, session_id) of sessions whose idle deadline passed, leased.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "claim_due", [self.keys.expiry(shard)], [limit, int(lease_s * MS_PER_S)]
        )
        pairs: list[tuple[str, str]] = []
        for member in res:
            runner_id, _, session_id = str(member).partition("\n")
            pairs.append((runner_id, session_id))
        return pairs

    async def expire_session(
        self, runner_id: str, session_id: str, *, idle_ttl_s: int, shards: int
    ) -> tuple[PairingSession | None, list[OutboxEntry]]:
        """Close a session idle for `idle_ttl_s`, or move its expiry entry to its deadline.

        Returns:
            (the closed session or None, the outbox entry this call wrote).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "expire_session",
            [self.keys.runner_sessions(runner_id), self.keys.outbox(runner_id)],
            [session_id, idle_ttl_s * MS_PER_S],
        )
        # Deadlines are kept in the runner's shard; one written before they were (in the
        # session's shard) is moved there when it comes due.
        key = self.keys.expiry(self.keys.shard_of(runner_id, shards))
        legacy = self.keys.expiry(self.keys.shard_of(session_id, shards))
        member = f"{runner_id}\n{session_id}"
        drop: list[Call] = [RawCall(("ZREM", legacy, member))] if legacy != key else []
        if res[0] == "alive":
            # Runner traffic kept it alive: move its deadline, and keep the app's index
            # and the by-id lookup (other slots, with plain TTLs) alive as long.
            deadline_ms, app_id, now_ms = int(res[1]), str(res[2]), int(res[3])
            ttl_s = -(-(deadline_ms - now_ms) // MS_PER_S) + SESSION_KEYS_MARGIN_S
            await self.batch(
                [
                    ScriptCall("mark_due", (key,), (member, 0, deadline_ms, 1)),
                    RawCall(("EXPIRE", self.keys.app_sessions(app_id), ttl_s)),
                    RawCall(("EXPIRE", self.keys.session(session_id), ttl_s)),
                    *drop,
                ]
            )
            return None, []
        await self.batch([RawCall(("ZREM", key, member)), *drop])
        if res[0] == "gone":
            return None, []
        closed = parse_session(res[1])
        await self.drop_session_indexes([closed])
        return closed, parse_outbox(runner_id, res[2])
