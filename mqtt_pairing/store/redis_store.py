"""PairingStore: every check-and-change of the service as one Lua script on one hash tag.

Scripts live in `lua/` beside this module, each with its `KEYS`/`ARGV` contract at the
top; `_prelude.lua` (Redis time in ms) is prepended to each. They are sent once and run
by EVALSHA; redis-py reloads a script after `NOSCRIPT` (restart, failover, SCRIPT FLUSH).
Redis errors are turned into domain errors here and nowhere else: connection problems and
timeouts become `StoreUnavailable`, anything else `InternalError`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypeVar, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from mqtt_pairing import policy
from mqtt_pairing.errors import (
    Banned,
    CodeAlreadyUsed,
    CodeExpired,
    CodeNotFound,
    InternalError,
    RateLimited,
    RunnerOffline,
    SessionLimitReached,
    StoreUnavailable,
)
from mqtt_pairing.models import ClosedReason, PairingHistoryEntry, PairingSession
from mqtt_pairing.store.keys import MS_PER_S, KeySchema

log = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["runner", "app"]

SCRIPT_NAMES = (
    "begin_request",
    "finish_request",
    "reserve_budget",
    "issue_code",
    "set_runner_code",
    "clear_runner_code",
    "end_code",
    "claim_code",
    "unclaim_code",
    "open_session",
    "close_sessions",
    "touch_sessions",
    "set_ban",
    "heartbeat",
    "record_status",
    "expire_session",
    "ack_outbox",
    "mark_due",
    "claim_due",
    "append_history",
)
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN
    TryAgainError,  # a slot moving during resharding
    ReadOnlyError,  # a replica being promoted
    SlotNotCoveredError,  # a master down and no replica took over yet
)
"""Errors that mean "Redis is not there right now": SERVICE_UNAVAILABLE, retry later."""

CLAIM_IN_FLIGHT_S = 2.0
"""How long a claimed use may still be given back by the pair that holds it (its session
refused); a claim on a used-up code waits that long at most before CODE_ALREADY_USED."""
_CLAIM_RETRY_S = 0.02
UNAVAILABLE_RETRY_S = 2
"""`retry_after_s` of a SERVICE_UNAVAILABLE reply."""


def load_script_source(name: str) -> str:
    """The Lua source of script `name`, with the shared prelude prepended."""
    lua = resources.files("mqtt_pairing.store") / "lua"
    return (lua / "_prelude.lua").read_text() + "\n" + (lua / f"{name}.lua").read_text()


def connect_redis(url: str, *, timeout_s: float = 1.0, cluster: bool = False) -> aioredis.Redis:
    """A redis-py asyncio client for `url` with timeouts on connect and on every command.

    Args:
        url: `redis://` or `rediss://` URL (with password and db as usual).
        timeout_s: socket connect and read timeout, seconds.
        cluster: use `RedisCluster` (any node of the cluster as `url`). It runs EVALSHA on
            the node that owns the keys' slot, which is why every script keeps to one
            hash tag; it shares the command API, hence the return type.
    """
    if cluster:
        client = RedisCluster.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return cast(aioredis.Redis, client)
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
    )


def _ceil_s(ms: int) -> int:
    return max(1, -(-int(ms) // MS_PER_S))


@dataclass(frozen=True, slots=True)
class Begin:
    """Outcome of `begin_request` that lets the request go on."""

    allowlisted: bool
    now_ms: int
    takeover: bool


@dataclass(frozen=True, slots=True)
class Replay:
    """The request was answered before: its remembered reply (as stored)."""

    reply: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A copy of the request is being handled elsewhere right now."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The request_id was used before with another payload."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A use of a code taken for (app_id, request_id)."""

    runner_id: str
    session_id: str
    uses_left: int
    max_uses: int
    repeat: bool
    first_char: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One event waiting in a runner's outbox (see `services.outbox.render`).

    Attributes:
        stream_id: the entry's id in the runner's outbox stream.
        runner_id: whose outbox it is in.
        type: the event: session.opened, session.closed, code.used, runner.online, ...
        session: the session it is about (internal JSON form), or None.
        extra: further fields (e.g. uses_left, app_public_key, the sessions to notify).
        at_ms: when it happened, ms (Redis time).
    """

    stream_id: str
    runner_id: str
    type: str
    session: PairingSession | None
    extra: dict[str, Any]
    at_ms: int


def parse_outbox(runner_id: str, raw: Sequence[Any]) -> list[OutboxEntry]:
    """Entries as XRANGE returns them (`[[id, [field, value, ...]], ...]`)."""
    out: list[OutboxEntry] = []
    for stream_id, fields in raw:
        if isinstance(fields, dict):
            data = fields
        else:
            data = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append(
            OutboxEntry(
                stream_id=str(stream_id),
                runner_id=runner_id,
                type=str(data.get("t", "")),
                session=_session(data["s"]) if data.get("s") else None,
                extra=json.loads(data.get("x") or "{}"),
                at_ms=int(data.get("at") or 0),
            )
        )
    return out


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


def _session(raw: str) -> PairingSession:
    return PairingSession.model_validate_json(raw)


class PairingStore:
    """Domain verbs over Redis; every multi-step change is one Lua script.

    Args:
        client: a redis-py asyncio client with `decode_responses=True`.
        keys: key templates (prefix from `PAIRING_KEY_PREFIX`).
    """

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self.client = client
        self.keys = keys
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_script_source(name)) for name in SCRIPT_NAMES
        }

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        try:
            return await awaitable
        except _UNAVAILABLE as exc:
            log.warning("redis unreachable: %s", type(exc).__name__)
            raise StoreUnavailable(retry_after_s=UNAVAILABLE_RETRY_S) from None
        except RedisError as exc:
            log.error("redis error: %s", type(exc).__name__)  # noqa: TRY400 - no traceback in logs
            raise InternalError from None

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:  # noqa: ANN401
        script = self._scripts[name]
        return await self._guard(script(keys=list(keys), args=list(args)))

    async def ping(self) -> bool:
        """True when Redis answers PING.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return bool(await self._guard(self.client.ping()))

    # ---- requests: idempotency and limits -------------------------------------------

    async def begin_request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        payload_hash: str,
        *,
        member: str,
        lease_s: int,
        dedupe_ttl_s: int,
        check_ban: bool,
        check_penalty: bool,
        request_limit: int = 0,
        request_window_s: int = 60,
    ) -> Begin | Replay | Pending | Mismatch:
        """Replay check, admin ban, penalty and request rate, then the pending mark.

        Raises:
            Banned: an admin ban is in force (`retry_after_s` unless permanent).
            RateLimited: a penalty or the request rate (`retry_after_s` set).
            StoreUnavailable: Redis is unreachable.
        """
        k = self.keys
        res = await self._run(
            "begin_request",
            [
                k.dedupe(kind, ident, op, request_id),
                k.ban(kind, ident),
                k.allow(kind, ident),
                k.limit(kind, ident),
                k.limit_requests(kind, ident),
            ],
            [
                payload_hash,
                lease_s * MS_PER_S,
                dedupe_ttl_s * MS_PER_S,
                int(check_ban),
                int(check_penalty),
                request_limit,
                request_window_s * MS_PER_S,
                member,
            ],
        )
        status = res[0]
        if status == "ok":
            return Begin(allowlisted=bool(res[1]), now_ms=int(res[2]), takeover=bool(res[3]))
        if status == "replay":
            return Replay(reply=res[1])
        if status == "pending":
            return Pending()
        if status == "mismatch":
            return Mismatch()
        if status == "banned":
            retry = int(res[1])
            raise Banned(retry_after_s=None if retry < 0 else _ceil_s(retry))
        if status == "limited":
            raise RateLimited(retry_after_s=_ceil_s(int(res[1])))
        raise InternalError

    async def finish_request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        *,
        reply: str | None,
        dedupe_ttl_s: int,
        outcome: Literal["", "failure", "success"] = "",
        allowlisted: bool = False,
        fail_limit: int = 5,
        fail_window_s: int = 60,
        penalty_s: int = 300,
        penalty_max_s: int = 86_400,
        penalty_memory_s: int = 86_400,
        member: str = "",
        index_session: PairingSession | None = None,
        drop_session_id: str = "",
        idle_ttl_s: int = 2_592_000,
    ) -> tuple[int, int]:
        """Remember the reply and record the outcome of a request.

        Drops the pending mark instead when `reply` is None; records a failed guess (with
        the doubling penalty) or clears the failure window after a success; indexes a new
        session of an app.

        Returns:
            (penalty_s, strikes): the automatic penalty this failure started (0 if none).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        k = self.keys
        res = await self._run(
            "finish_request",
            [
                k.dedupe(kind, ident, op, request_id),
                k.limit(kind, ident),
                k.limit_failures(kind, ident),
                # Only an app has a session index; a runner passes a key of its own tag
                # that the script leaves alone (it writes the index only for a session).
                k.app_sessions(ident) if kind == "app" else k.limit(kind, ident),
            ],
            [
                "forget" if reply is None else "remember",
                reply or "",
                dedupe_ttl_s * MS_PER_S,
                outcome,
                int(allowlisted),
                fail_limit,
                fail_window_s * MS_PER_S,
                penalty_s * MS_PER_S,
                penalty_max_s * MS_PER_S,
                penalty_memory_s * MS_PER_S,
                member,
                index_session.session_id if index_session else "",
                index_session.runner_id if index_session else "",
                drop_session_id,
                idle_ttl_s * MS_PER_S,
            ],
        )
        penalty_ms, strikes = int(res[0]), int(res[1])
        return (_ceil_s(penalty_ms) if penalty_ms else 0), strikes

    async def reserve_budget(
        self, member: str, *, limit: int, window_s: int, shards: int, peek: bool = False
    ) -> None:
        """Reserve one unit of the global failure budget (or only check it, `peek`).

        The budget is sharded over `shards` keys ({global:<n>}); each shard allows
        `limit // shards` units (at least 1) per window.

        Raises:
            RateLimited: the budget is spent (`retry_after_s` until a unit frees).
            StoreUnavailable: Redis is unreachable.
        """
        shard = self.keys.budget_shard(member, shards)
        per_shard = max(1, limit // shards)
        res = await self._run(
            "reserve_budget",
            [self.keys.budget(shard)],
            [member, per_shard, window_s * MS_PER_S, "peek" if peek else "reserve"],
        )
        if int(res[0]) != 1:
            raise RateLimited("too many failed attempts overall", retry_after_s=_ceil_s(res[1]))

    async def refund_budget(self, member: str, *, shards: int) -> None:
        """Give back the unit reserved by `member` (after a success).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        shard = self.keys.budget_shard(member, shards)
        await self._guard(self.client.zrem(self.keys.budget(shard), member))

    # ---- codes ------------------------------------------------------------------------

    async def issue_code(
        self,
        digest: str,
        runner_id: str,
        *,
        max_uses: int,
        ttl_s: int,
        tombstone_s: int,
        first_char: str,
        fingerprint: str,
    ) -> tuple[int, int] | None:
        """Create a code under `digest`.

        Returns:
            (created_ms, expires_ms), or None if the digest is taken (draw again).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "issue_code",
            [self.keys.code(digest)],
            [
                runner_id,
                max_uses,
                ttl_s * MS_PER_S,
                tombstone_s * MS_PER_S,
                first_char,
                fingerprint,
            ],
        )
        if int(res[0]) != 1:
            return None
        return int(res[1]), int(res[2])

    async def set_runner_code(
        self,
        runner_id: str,
        digest: str,
        *,
        expires_ms: int,
        idle_ttl_s: int,
        request_id: str,
        sealed_reply: str,
        dedupe_ttl_s: int,
        name: str | None,
        public_key: str | None,
        metadata: dict[str, Any] | None,
    ) -> str | None:
        """Make `digest` the runner's active code and remember the sealed reply.

        Returns:
            The digest of the code it replaced, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        old = await self._run(
            "set_runner_code",
            [
                self.keys.runner(runner_id),
                self.keys.dedupe("runner", runner_id, "code", request_id),
            ],
            [
                digest,
                expires_ms,
                idle_ttl_s * MS_PER_S,
                sealed_reply,
                dedupe_ttl_s * MS_PER_S,
                name or "",
                public_key or "",
                json.dumps(metadata, separators=(",", ":")) if metadata is not None else "",
            ],
        )
        return old or None

    async def clear_runner_code(self, runner_id: str) -> str | None:
        """Forget the runner's active code.

        Returns:
            The digest of the code that was active, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        old = await self._run("clear_runner_code", [self.keys.runner(runner_id)], [])
        return old or None

    async def end_code(
        self, digest: str, runner_id: str, state: Literal["replaced", "cancelled"]
    ) -> bool:
        """Mark a code replaced or cancelled; True if it was live until now.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run("end_code", [self.keys.code(digest)], [state, runner_id])
        return int(res) == 1

    async def claim_code(self, digest: str, app_id: str, request_id: str, session_id: str) -> Claim:
        """Take one use of the code for (app_id, request_id); a repeat returns the same.

        Raises:
            CodeNotFound, CodeExpired, CodeAlreadyUsed: the lookup failed.
            StoreUnavailable: Redis is unreachable.
        """
        deadline = asyncio.get_running_loop().time() + CLAIM_IN_FLIGHT_S
        while True:
            res = await self._run(
                "claim_code",
                [self.keys.code(digest), self.keys.code_claims(digest)],
                [f"{app_id}\n{request_id}", session_id, int(CLAIM_IN_FLIGHT_S * MS_PER_S)],
            )
            if res[0] != "busy" or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(_CLAIM_RETRY_S)
        status = res[0]
        if status == "ok":
            return Claim(
                runner_id=res[1],
                session_id=res[2],
                uses_left=int(res[3]),
                max_uses=int(res[4]),
                repeat=bool(int(res[5])),
                first_char=res[6] or "?",
                fingerprint=res[7] or "",
            )
        if status == "expired":
            raise CodeExpired
        if status in ("used", "busy"):
            raise CodeAlreadyUsed
        raise CodeNotFound

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

    # ---- sessions ---------------------------------------------------------------------

    async def open_session(
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
    ) -> OpenedSession:
        """Open the session of a claimed use in the runner's slot.

        Raises:
            CodeAlreadyUsed: the code is no longer the runner's active code.
            RunnerOffline: the runner is known to be offline.
            SessionLimitReached: the runner has `max_sessions` active sessions.
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "open_session",
            [
                self.keys.runner(runner_id),
                self.keys.runner_sessions(runner_id),
                self.keys.outbox(runner_id),
            ],
            [
                digest,
                session_id,
                runner_id,
                app_id,
                app_name or "",
                idle_ttl_s * MS_PER_S,
                max_sessions,
                json.dumps({"app_public_key": app_public_key, "app_metadata": app_metadata}),
                uses_left,
            ],
        )
        status = res[0]
        if status == "ok":
            return OpenedSession(
                session=_session(res[1]),
                replaced=_session(res[2]) if res[2] else None,
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
            The closed sessions (state closed, closed_reason set), and the runner's outbox
            (which now holds their session.closed events).

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
        closed = [_session(raw) for raw in res[0]]
        await self.drop_session_indexes(closed)
        return closed, parse_outbox(runner_id, res[1])

    async def drop_session_indexes(self, sessions: Sequence[PairingSession]) -> None:
        """Remove closed sessions from their apps' indexes and the by-id lookup.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not sessions:
            return
        pipe = self.client.pipeline(transaction=False)
        for s in sessions:
            pipe.hdel(self.keys.app_sessions(s.app_id), s.session_id)
            pipe.delete(self.keys.session(s.session_id))
        await self._guard(pipe.execute())

    async def index_session(self, session: PairingSession, *, idle_ttl_s: int) -> None:
        """Write the by-id lookup of a session (`session:{session:<id>}`), idle TTL.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        value = json.dumps({"runner_id": session.runner_id, "app_id": session.app_id})
        await self._guard(
            self.client.set(self.keys.session(session.session_id), value, ex=idle_ttl_s)
        )

    async def find_session(self, session_id: str) -> tuple[str, str] | None:
        """(runner_id, app_id) of a session by id, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw = await self._guard(self.client.get(self.keys.session(session_id)))
        if raw is None:
            return None
        data = json.loads(raw)
        return str(data["runner_id"]), str(data["app_id"])

    async def app_session_runner(self, app_id: str, session_id: str) -> str | None:
        """The runner of one of the app's sessions, from the app's index, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        runner = await self._guard(self.client.hget(self.keys.app_sessions(app_id), session_id))
        return str(runner) if runner is not None else None

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
            [idle_ttl_s * MS_PER_S, app_id],
        )
        return sorted((_session(raw) for raw in res), key=lambda s: s.created_at_ms)

    async def app_sessions(self, app_id: str, *, idle_ttl_s: int) -> list[PairingSession]:
        """Active sessions of an app, refreshed; stale index entries are dropped.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        index: dict[str, str] = await self._guard(
            self.client.hgetall(self.keys.app_sessions(app_id))  # type: ignore[arg-type]
        )
        found: list[PairingSession] = []
        for runner_id in sorted(set(index.values())):
            found.extend(
                await self.runner_sessions(runner_id, idle_ttl_s=idle_ttl_s, app_id=app_id)
            )
        live = {s.session_id for s in found}
        stale = [sid for sid in index if sid not in live]
        if stale:
            await self._guard(self.client.hdel(self.keys.app_sessions(app_id), *stale))
        if found:
            await self._guard(self.client.expire(self.keys.app_sessions(app_id), idle_ttl_s))
        return sorted(found, key=lambda s: s.created_at_ms)

    # ---- presence -----------------------------------------------------------------------

    async def heartbeat(
        self, runner_id: str, *, idle_ttl_s: int, heartbeat_online_s: int
    ) -> list[OutboxEntry]:
        """Record a runner heartbeat and refresh its sessions.

        Returns:
            The runner's outbox if the heartbeat announced a change (offline to online),
            else an empty list.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "heartbeat",
            [
                self.keys.runner(runner_id),
                self.keys.runner_sessions(runner_id),
                self.keys.outbox(runner_id),
            ],
            [idle_ttl_s * MS_PER_S, heartbeat_online_s * MS_PER_S],
        )
        return parse_outbox(runner_id, res[1])

    async def record_status(
        self,
        runner_id: str,
        state: Literal["online", "offline"],
        *,
        retained: bool,
        heartbeat_online_s: int,
        idle_ttl_s: int,
    ) -> list[OutboxEntry]:
        """Record a runner's status message; announce a change between online and offline.

        Returns:
            The runner's outbox if presence changed (runner.online/offline written),
            else an empty list.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "record_status",
            [
                self.keys.runner(runner_id),
                self.keys.runner_sessions(runner_id),
                self.keys.outbox(runner_id),
            ],
            [state, int(retained), heartbeat_online_s * MS_PER_S, idle_ttl_s * MS_PER_S],
        )
        return parse_outbox(runner_id, res[1])

    async def presence(
        self, runner_ids: Sequence[str], *, heartbeat_online_s: int = 30
    ) -> dict[str, bool | None]:
        """Presence of runners by PROTOCOL.md "Presence" (True, False, or None: unknown).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not runner_ids:
            return {}
        secs, micros = await self._guard(self.client.time())
        now = int(secs) * MS_PER_S + int(micros) // MS_PER_S
        pipe = self.client.pipeline(transaction=False)
        for runner_id in runner_ids:
            pipe.hmget(self.keys.runner(runner_id), ["status", "status_ms", "hb_ms"])
        res = await self._guard(pipe.execute())
        out: dict[str, bool | None] = {}
        for runner_id, (status, status_ms, hb_ms) in zip(runner_ids, res, strict=True):
            out[runner_id] = policy.presence(
                status,
                int(status_ms or 0),
                int(hb_ms or 0),
                now,
                heartbeat_online_ms=heartbeat_online_s * MS_PER_S,
            )
        return out

    # ---- outbox and expiry sweep --------------------------------------------------------

    async def read_outbox(self, runner_id: str) -> list[OutboxEntry]:
        """What a runner's outbox holds (oldest first, up to 200).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw: Any = await self._guard(
            self.client.xrange(self.keys.outbox(runner_id), "-", "+", count=200)
        )
        return parse_outbox(runner_id, raw or [])

    async def ack_outbox(self, runner_id: str, stream_ids: Sequence[str], *, shards: int) -> int:
        """Delete published entries; when the outbox is empty, drop its due mark.

        Returns:
            Entries left in the outbox.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        left = int(await self._run("ack_outbox", [self.keys.outbox(runner_id)], list(stream_ids)))
        if left == 0:
            due = self.keys.outbox_due(self.keys.shard_of(runner_id, shards))
            await self._guard(self.client.zrem(due, runner_id))
        return left

    async def mark_outbox_due(self, runner_id: str, *, delay_s: float, shards: int) -> None:
        """Note that a runner's outbox must be drained `delay_s` seconds from now at the latest.

        The delay is a lease for the instance that publishes it right away; others pass 0.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        key = self.keys.outbox_due(self.keys.shard_of(runner_id, shards))
        await self._run("mark_due", [key], [runner_id, int(delay_s * MS_PER_S), "", 0])

    async def claim_due_outboxes(self, shard: int, *, limit: int, lease_s: float) -> list[str]:
        """Runner ids whose outbox is due in one shard, leased to the caller.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "claim_due", [self.keys.outbox_due(shard)], [limit, int(lease_s * MS_PER_S)]
        )
        return [str(m) for m in res]

    async def scan_outboxes(self) -> list[str]:
        """Runner ids of every non-empty outbox (SCAN; for recovery at start).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        marker = self.keys.outbox("\x00")
        head, tail = marker.split("\x00")
        found: list[str] = []
        async for key in self.client.scan_iter(match=f"{head}*{tail}", count=1000):
            found.append(str(key)[len(head) : len(str(key)) - len(tail)])
        return found

    async def schedule_expiry(
        self, session: PairingSession, *, idle_ttl_s: int, shards: int
    ) -> None:
        """Put a session in the expiry sets with its idle deadline.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        member = f"{session.runner_id}\n{session.session_id}"
        key = self.keys.expiry(self.keys.shard_of(session.session_id, shards))
        deadline = session.last_seen_at_ms + idle_ttl_s * MS_PER_S
        await self._run("mark_due", [key], [member, 0, deadline, 1])

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
            (the closed session or None, the runner's outbox).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "expire_session",
            [self.keys.runner_sessions(runner_id), self.keys.outbox(runner_id)],
            [session_id, idle_ttl_s * MS_PER_S],
        )
        key = self.keys.expiry(self.keys.shard_of(session_id, shards))
        member = f"{runner_id}\n{session_id}"
        if res[0] == "alive":
            await self._run("mark_due", [key], [member, 0, int(res[1]), 1])
            return None, []
        await self._guard(self.client.zrem(key, member))
        if res[0] == "gone":
            return None, []
        closed = _session(res[1])
        await self.drop_session_indexes([closed])
        return closed, parse_outbox(runner_id, res[2])

    # ---- history ----------------------------------------------------------------------

    async def append_history(
        self,
        entries: Sequence[PairingHistoryEntry],
        *,
        max_len: int,
        identity_max_len: int,
        retention_s: int,
        shards: int,
    ) -> None:
        """Append records to the global history and to each identity's history.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not entries:
            return
        calls: list[tuple[str, list[str | int]]] = []
        retention_ms = retention_s * MS_PER_S
        for entry in entries:
            fields: list[str | int] = []
            for name, value in entry.model_dump(exclude={"at_ms"}, exclude_none=True).items():
                fields += [name, str(value)]
            anchor = entry.app_id or entry.runner_id or entry.event
            shard = self.keys.shard_of(anchor, shards)
            calls.append((self.keys.history_global(shard), [max_len, retention_ms, 0, *fields]))
            if entry.runner_id:
                key = self.keys.history("runner", entry.runner_id)
                calls.append((key, [identity_max_len, retention_ms, 1, *fields]))
            if entry.app_id:
                key = self.keys.history("app", entry.app_id)
                calls.append((key, [identity_max_len, retention_ms, 1, *fields]))
        await self._run_many("append_history", calls)

    async def _run_many(self, name: str, calls: Sequence[tuple[str, Sequence[str | int]]]) -> None:
        """Run one script over many single-key calls.

        One pipeline on a single Redis; concurrent calls on a cluster, whose pipelines
        refuse EVALSHA.
        """
        script = self._scripts[name]
        if isinstance(self.client, RedisCluster):
            await asyncio.gather(
                *(self._guard(script(keys=[key], args=list(args))) for key, args in calls)
            )
            return
        pipe = self.client.pipeline(transaction=False)
        for key, args in calls:
            await script(keys=[key], args=list(args), client=pipe)
        await self._guard(pipe.execute())

    # ---- bans and allowlist -----------------------------------------------------------

    async def set_ban(
        self, kind: Kind, ident: str, *, reason: str, by: str, duration_s: int | None
    ) -> None:
        """Ban an app or runner for `duration_s` seconds (None: permanent).

        Banning a runner cancels its active code (PROTOCOL.md "Runner code").

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        other = self.keys.runner(ident) if kind == "runner" else self.keys.allow(kind, ident)
        old = await self._run(
            "set_ban",
            [self.keys.ban(kind, ident), other],
            [
                reason,
                by,
                -1 if duration_s is None else duration_s * MS_PER_S,
                int(kind == "runner"),
            ],
        )
        if old:
            await self.end_code(old, ident, "cancelled")

    async def remove_ban(self, kind: Kind, ident: str) -> bool:
        """Lift an admin ban; True if there was one.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return bool(await self._guard(self.client.delete(self.keys.ban(kind, ident))))

    async def set_allowed(self, kind: Kind, ident: str, allowed: bool) -> None:
        """Add to (or remove from) the allowlist exempt from automatic penalties.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        key = self.keys.allow(kind, ident)
        if allowed:
            await self._guard(self.client.set(key, "1"))
        else:
            await self._guard(self.client.delete(key))
