"""RateLimitService: idempotency, admin bans, penalties, request rates, failure budget.

The numbers come from settings whose defaults are docs/protocol.md "Default limits"; the
enforcement is in the store's Lua scripts (one identity's slot, or a budget shard).
"""

from __future__ import annotations

from typing import Literal

from mqtt_pairing.config import Settings
from mqtt_pairing.services.attempts import AttemptKey, Attempts
from mqtt_pairing.store.redis_store import (
    Begin,
    Mismatch,
    PairingStore,
    Pending,
    RawCall,
    Replay,
    ScriptCall,
)
from mqtt_pairing.topics import Identity, Kind

IDEMPOTENT_OPS = frozenset({("runner", "code"), ("runner", "cancel-code"), ("runner", "unpair")})
IDEMPOTENT_OPS |= {("app", "pair"), ("app", "unpair")}


class RateLimitService:
    """Limits and idempotency of requests, per docs/protocol.md.

    Args:
        store: the Redis store.
        settings: limits, windows and TTLs (seconds).

    Attributes:
        attempts: attempts of idempotent requests running here, and the ones abandoned
            when Redis stopped answering (their pending marks may be written late).
    """

    def __init__(self, store: PairingStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.attempts = Attempts(settings.pairing_pending_lease_s + 1)

    @staticmethod
    def attempt_key(identity: Identity, op: str, request_id: str) -> AttemptKey:
        """The key of a request in `attempts`."""
        return (identity.kind.value, identity.id, op, request_id)

    def begin_call(
        self, identity: Identity, op: str, request_id: str, payload_hash: str
    ) -> ScriptCall:
        """The `begin_request` call for an op.

        Replay check, then (for `pair` and `code`) ban, penalty and request rate.
        """
        s = self.settings
        limit, window, guesses = 0, 60, 0
        if identity.kind is Kind.APP and op == "pair":
            limit, window = s.pairing_app_request_limit, s.pairing_app_request_window_s
            guesses = s.pairing_fail_limit
        elif identity.kind is Kind.RUNNER and op == "code":
            limit, window = s.pairing_runner_code_limit, s.pairing_runner_code_window_s
        return self.store.begin_call(
            identity.kind.value,
            identity.id,
            op,
            request_id,
            payload_hash,
            lease_s=s.pairing_pending_lease_s,
            dedupe_ttl_s=s.pairing_dedupe_ttl_s,
            check_ban=op in ("pair", "code"),
            check_penalty=op == "pair",
            request_limit=limit,
            request_window_s=window,
            guess_limit=guesses,
            guess_window_s=s.pairing_fail_window_s,
        )

    async def begin(
        self, identity: Identity, op: str, request_id: str, payload_hash: str
    ) -> Begin | Replay | Pending | Mismatch:
        """Replay check, then (for `pair` and `code`) ban, penalty and request rate.

        Raises:
            Banned: an admin ban is in force.
            RateLimited: penalty or request rate.
            StoreUnavailable: Redis is unreachable.
        """
        call = self.begin_call(identity, op, request_id, payload_hash)
        return self.store.parse_begin(await self.store.call(call))

    def finish_call(
        self,
        identity: Identity,
        op: str,
        request_id: str,
        *,
        reply: str | None,
        outcome: Literal["", "failure", "success"] = "",
        allowlisted: bool = False,
        begun: Begin | None = None,
    ) -> ScriptCall:
        """The `finish_request` call: remember the reply and record a guess.

        A `reply` of None drops the pending mark; the result goes to `store.parse_finish`.
        `begun` (this request's `begin_request` outcome) passes its Redis time on, so the
        script need not read it again, and says whether a success has failures to clear.
        """
        s = self.settings
        return self.store.finish_call(
            identity.kind.value,
            identity.id,
            op,
            request_id,
            reply=reply,
            dedupe_ttl_s=s.pairing_dedupe_ttl_s,
            outcome=outcome,
            allowlisted=allowlisted,
            fail_limit=s.pairing_fail_limit,
            fail_window_s=s.pairing_fail_window_s,
            penalty_s=s.pairing_penalty_s,
            penalty_max_s=s.pairing_penalty_max_s,
            penalty_memory_s=s.pairing_penalty_memory_s,
            now_ms=begun.now_ms if begun is not None else 0,
            failures=begun.failures if begun is not None else True,
            payload_hash=begun.payload_hash if begun is not None else "",
            guessing=begun.guessing if begun is not None else False,
            idle_ttl_s=s.pairing_session_idle_ttl_s,
        )

    async def finish(
        self,
        identity: Identity,
        op: str,
        request_id: str,
        *,
        reply: str | None,
        outcome: Literal["", "failure", "success"] = "",
        allowlisted: bool = False,
        begun: Begin | None = None,
    ) -> int:
        """Remember the reply (None: drop the pending mark) and record a guess.

        Returns:
            The automatic penalty (seconds) that this failure started, or 0.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        call = self.finish_call(
            identity,
            op,
            request_id,
            reply=reply,
            outcome=outcome,
            allowlisted=allowlisted,
            begun=begun,
        )
        penalty_s, _strikes = self.store.parse_finish(await self.store.call(call))
        return penalty_s

    def budget_member(self, app_id: str, request_id: str) -> str:
        """The budget reservation of one pair request (same for its retries)."""
        return f"{app_id}\n{request_id}"

    def budget_call(self, member: str, *, peek: bool = False) -> ScriptCall:
        """The call that reserves a unit of the global failure budget (or checks it)."""
        s = self.settings
        return self.store.budget_call(
            member,
            limit=s.pairing_global_fail_limit,
            window_s=s.pairing_global_fail_window_s,
            shards=s.pairing_global_fail_shards,
            peek=peek,
        )

    def refund_call(self, member: str) -> RawCall:
        """The call that gives back the unit of a guess that succeeded."""
        return self.store.refund_call(member, shards=self.settings.pairing_global_fail_shards)

    async def reserve_budget(self, member: str, *, peek: bool = False) -> bool:
        """Reserve a unit of the global failure budget (or check it, `peek`).

        Returns:
            True if this call reserved the unit.

        Raises:
            RateLimited: the budget is spent.
            StoreUnavailable: Redis is unreachable.
        """
        return self.store.parse_budget(await self.store.call(self.budget_call(member, peek=peek)))

    async def refund_budget(self, member: str) -> None:
        """Give back the unit of a guess that succeeded.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.store.call(self.refund_call(member))
