"""Limits and bans: idempotency, bans, allowlist, penalties, request rate, failure budget.

See docs/protocol.md "Idempotency" and "Default limits".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mqtt_pairing.errors import (
    Banned,
    InternalError,
    RateLimited,
)
from mqtt_pairing.store.keys import MS_PER_S, session_keys_ttl_ms
from mqtt_pairing.store.transport import (
    Kind,
    RawCall,
    ScriptCall,
    Transport,
    ceil_s,
)


@dataclass(frozen=True, slots=True)
class Begin:
    """Outcome of `begin_request` that lets the request go on."""

    allowlisted: bool
    now_ms: int
    takeover: bool
    failures: bool = True
    """The identity's failure log may hold a guess (a success then has one to clear)."""
    payload_hash: str = ""
    """The request's payload hash, for `finish_call` (its dedupe record holds it)."""
    guessing: bool = False
    """Noted as a guess in flight (`begin_call`'s `guess_limit`): `finish_call` takes it off."""


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


LIMITS_SCRIPTS = ("begin_request", "finish_request", "reserve_budget", "set_ban")
"""The Lua scripts (store/lua/) of this aggregate."""


class LimitStore(Transport):
    """Requests' replay checks and limits, the failure budget, bans and the allowlist."""

    # ---- requests: idempotency and limits -------------------------------------------

    async def begin_request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        payload_hash: str,
        **options: Any,  # noqa: ANN401 - as begin_call
    ) -> Begin | Replay | Pending | Mismatch:
        """Replay check, admin ban, penalty and request rate, then the pending mark.

        Keyword arguments as `begin_call`.

        Raises:
            Banned: an admin ban is in force (`retry_after_s` unless permanent).
            RateLimited: a penalty or the request rate (`retry_after_s` set).
            StoreUnavailable: Redis is unreachable.
        """
        call = self.begin_call(kind, ident, op, request_id, payload_hash, **options)
        return self.parse_begin(await self.call(call))

    def begin_call(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        payload_hash: str,
        *,
        lease_s: int,
        dedupe_ttl_s: int,
        check_ban: bool,
        check_penalty: bool,
        request_limit: int = 0,
        request_window_s: int = 60,
        guess_limit: int = 0,
        guess_window_s: int = 60,
    ) -> ScriptCall:
        """The `begin_request` call: replay check, ban, penalty, request rate, pending mark.

        With `guess_limit` (the failed guesses allowed per `guess_window_s`, docs/protocol.md
        "Default limits"), the request is a guess: refused (`RATE_LIMITED`, 1 s) while the
        identity's failures in the window and its guesses in flight reach the limit, so
        that concurrent guesses cannot overshoot it; else noted in flight until
        `finish_call` (or the pending lease) ends it. Its result goes to `parse_begin`.
        """
        k = self.keys
        return ScriptCall(
            "begin_request",
            (k.dedupe(kind, ident, op, request_id), k.limit(kind, ident)),
            (
                payload_hash,
                lease_s * MS_PER_S,
                dedupe_ttl_s * MS_PER_S,
                int(check_ban),
                int(check_penalty),
                request_limit,
                request_window_s * MS_PER_S,
                guess_limit,
                guess_window_s * MS_PER_S,
            ),
        )

    @staticmethod
    def parse_begin(res: Any) -> Begin | Replay | Pending | Mismatch:  # noqa: ANN401
        """The outcome of a `begin_request` call.

        Raises:
            Banned: an admin ban is in force (`retry_after_s` unless permanent).
            RateLimited: a penalty or the request rate (`retry_after_s` set).
        """
        status = res[0]
        if status == "ok":
            return Begin(
                allowlisted=bool(res[1]),
                now_ms=int(res[2]),
                takeover=bool(res[3]),
                failures=bool(res[4]) if len(res) > 4 else True,
                payload_hash=str(res[5]) if len(res) > 5 else "",
                guessing=bool(int(res[6])) if len(res) > 6 else False,
            )
        if status == "replay":
            return Replay(reply=res[1])
        if status == "pending":
            return Pending()
        if status == "mismatch":
            return Mismatch()
        if status == "banned":
            retry = int(res[1])
            raise Banned(retry_after_s=None if retry < 0 else ceil_s(retry))
        if status == "limited":
            raise RateLimited(retry_after_s=ceil_s(int(res[1])))
        raise InternalError

    async def finish_request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        **options: Any,  # noqa: ANN401 - as finish_call
    ) -> tuple[int, int]:
        """Remember the reply and record the outcome of a request (see `finish_call`).

        Returns:
            (penalty_s, strikes): the automatic penalty this failure started (0 if none).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        call = self.finish_call(kind, ident, op, request_id, **options)
        return self.parse_finish(await self.call(call))

    def finish_call(
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
        now_ms: int = 0,
        failures: bool = True,
        payload_hash: str = "",
        guessing: bool = False,
        idle_ttl_s: int = 2_592_000,
    ) -> ScriptCall:
        """The `finish_request` call: remember the reply and record the outcome.

        Drops the pending mark instead when `reply` is None; records a failed guess (with
        the doubling penalty) or clears the failure log after a success. `now_ms` is the
        Redis time that `begin_request` read for this request (`Begin.now_ms`; 0: the
        script reads it), `failures` False (`Begin.failures`) says there is no failure
        log to clear, and `payload_hash` (`Begin.payload_hash`; '': the script reads it
        from the record) goes into the remembered record. (The same script indexes a
        session under its app: `app_index_call`.)

        Its result goes to `parse_finish`.
        """
        k = self.keys
        return ScriptCall(
            "finish_request",
            (
                k.dedupe(kind, ident, op, request_id),
                k.limit(kind, ident),
                k.limit(kind, ident),  # unused by these modes
                # Only an app has a session index; a runner passes a key of its own tag
                # that the script leaves alone (it writes the index only for a session).
                k.app_sessions(ident) if kind == "app" else k.limit(kind, ident),
            ),
            (
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
                now_ms or "",
                "",  # the app index: see app_index_call
                "",
                "",
                session_keys_ttl_ms(idle_ttl_s),
                int(failures),
                payload_hash,
                int(guessing),
            ),
        )

    @staticmethod
    def parse_finish(res: Any) -> tuple[int, int]:  # noqa: ANN401
        """(penalty_s, strikes): the automatic penalty a failure started (0 if none)."""
        penalty_ms, strikes = int(res[0]), int(res[1])
        return (ceil_s(penalty_ms) if penalty_ms else 0), strikes

    def budget_call(
        self, member: str, *, limit: int, window_s: int, shards: int, peek: bool = False
    ) -> ScriptCall:
        """The `reserve_budget` call for one unit of the global failure budget.

        The budget is sharded over `shards` keys ({global:<n>}); each shard allows
        `limit // shards` units (at least 1) per window. Its result goes to `parse_budget`.
        """
        shard = self.keys.budget_shard(member, shards)
        per_shard = max(1, limit // shards)
        return ScriptCall(
            "reserve_budget",
            (self.keys.budget(shard),),
            (member, per_shard, window_s * MS_PER_S, "peek" if peek else "reserve"),
        )

    @staticmethod
    def parse_budget(res: Any) -> bool:  # noqa: ANN401
        """True if a unit was reserved by this call (False: already held, or a peek).

        Raises:
            RateLimited: the budget is spent (`retry_after_s` until a unit frees).
        """
        if int(res[0]) != 1:
            raise RateLimited("too many failed attempts overall", retry_after_s=ceil_s(res[1]))
        return bool(int(res[1])) if len(res) > 1 else False

    async def reserve_budget(
        self, member: str, *, limit: int, window_s: int, shards: int, peek: bool = False
    ) -> bool:
        """Reserve one unit of the global failure budget (or only check it, `peek`).

        Returns:
            True if this call reserved the unit.

        Raises:
            RateLimited: the budget is spent (`retry_after_s` until a unit frees).
            StoreUnavailable: Redis is unreachable.
        """
        call = self.budget_call(member, limit=limit, window_s=window_s, shards=shards, peek=peek)
        return self.parse_budget(await self.call(call))

    def refund_call(self, member: str, *, shards: int) -> RawCall:
        """The ZREM that gives back the budget unit of `member`."""
        shard = self.keys.budget_shard(member, shards)
        return RawCall(("ZREM", self.keys.budget(shard), member))

    async def refund_budget(self, member: str, *, shards: int) -> None:
        """Give back the unit reserved by `member` (after a success).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        shard = self.keys.budget_shard(member, shards)
        await self.call(RawCall(("ZREM", self.keys.budget(shard), member)))

    # ---- bans and allowlist -----------------------------------------------------------
    # They live in the identity's limit hash with its penalty and logs (set_ban.lua); the
    # ban itself, which also cancels a runner's code, is `PairingStore.set_ban`.

    async def lift_ban(self, kind: Kind, ident: str, *, penalty: bool) -> tuple[bool, bool]:
        """Lift an admin ban and, with `penalty`, the automatic penalty.

        Lifting the penalty also forgets its strikes and the failure log.

        Returns:
            (an admin ban was in force, an automatic penalty was in force).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        k = self.keys.limit(kind, ident)
        had_ban, had_penalty = await self._run("set_ban", [k, k], ["unban", int(penalty)])
        return bool(int(had_ban)), bool(int(had_penalty))

    async def remove_ban(self, kind: Kind, ident: str) -> bool:
        """Lift an admin ban; True if there was one in force.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return (await self.lift_ban(kind, ident, penalty=False))[0]

    async def set_allowed(self, kind: Kind, ident: str, allowed: bool) -> bool:
        """Add to (or remove from) the allowlist exempt from automatic penalties.

        Returns:
            Whether anything changed.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        k = self.keys.limit(kind, ident)
        op = "allow" if allowed else "disallow"
        return bool(int(await self._run("set_ban", [k, k], [op])))
