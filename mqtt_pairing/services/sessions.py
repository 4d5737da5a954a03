"""PairingSessionService: pair, list, unpair (PROTOCOL.md "App pair", "Other ops").

A pair crosses slots as DESIGN.md "A pair across slots" lays out; the app-slot steps
(replay, ban, limits; remembering the reply) are the dispatcher's and RateLimitService's,
this service runs the budget, code, runner and by-id steps in between.
"""

from __future__ import annotations

import logging
import uuid

from mqtt_pairing.codes import mask_code, normalise_code
from mqtt_pairing.config import Settings
from mqtt_pairing.errors import (
    CodeAlreadyUsed,
    CodeExpired,
    CodeNotFound,
    InvalidCodeFormat,
    PairingError,
    RunnerOffline,
    SessionLimitReached,
    SessionNotFound,
)
from mqtt_pairing.faults import fault_point
from mqtt_pairing.models import (
    ClosedReason,
    PairingHistoryEntry,
    PairingSession,
    PairRequest,
    error_reply,
    ok_reply,
)
from mqtt_pairing.services.codes import PairingCodeService
from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.services.ratelimit import RateLimitService
from mqtt_pairing.store.redis_store import OutboxEntry, PairingStore

log = logging.getLogger(__name__)


def new_session_id() -> str:
    """A fresh session id: a random UUID (122 bits), as text."""
    return str(uuid.uuid4())


def _error(request_id: str, exc: PairingError) -> dict[str, object]:
    return error_reply(request_id, exc.code, exc.message, exc.retry_after_s)


class PairingSessionService:
    """Opens, lists and closes pairing sessions.

    Args:
        store: the Redis store.
        settings: session limit and idle TTL (seconds).
        codes: digests of codes.
        limits: the failure budget.
    """

    def __init__(
        self,
        store: PairingStore,
        settings: Settings,
        codes: PairingCodeService,
        limits: RateLimitService,
    ) -> None:
        self.store = store
        self.settings = settings
        self.codes = codes
        self.limits = limits

    async def pair(self, app_id: str, req: PairRequest, *, allowlisted: bool) -> Handled:
        """Steps 2-4 of a pair, after the app slot let it through.

        Returns:
            A `Handled` whose reply is the result or a remembered error; failed guesses
            carry outcome "failure" so the app slot counts them.

        Raises:
            RateLimited: the global failure budget is spent (not remembered).
            RunnerOffline: the runner is known to be offline (not remembered).
            StoreUnavailable: Redis is unreachable.
        """
        rid = req.request_id
        member = self.limits.budget_member(app_id, rid)
        try:
            code = normalise_code(req.code)
        except InvalidCodeFormat as exc:
            await self.limits.reserve_budget(member, peek=True)
            return Handled(_error(rid, exc))
        await self.limits.reserve_budget(member)
        digest = self.codes.digest(code)
        try:
            claim = await self.store.claim_code(digest, app_id, rid, new_session_id())
        except (CodeNotFound, CodeExpired, CodeAlreadyUsed) as exc:
            guessed = mask_code(code[0], digest)
            log.info("pair failed app=%s code=%s error=%s", app_id, guessed, exc.code)
            return Handled(
                _error(rid, exc),
                outcome="failure",
                history=[_failed(app_id, None, guessed, exc)],
            )
        fault_point("after_claim")
        masked = mask_code(claim.first_char, digest)
        s = self.settings
        try:
            opened = await self.store.open_session(
                digest=digest,
                session_id=claim.session_id,
                runner_id=claim.runner_id,
                app_id=app_id,
                app_name=req.app_name,
                idle_ttl_s=s.pairing_session_idle_ttl_s,
                max_sessions=s.pairing_max_sessions_per_runner,
                uses_left=claim.uses_left,
                app_public_key=req.public_key,
                app_metadata=req.metadata,
            )
        except (CodeAlreadyUsed, RunnerOffline, SessionLimitReached) as exc:
            await self.store.unclaim_code(digest, app_id, rid)
            log.info("pair refused app=%s code=%s error=%s", app_id, masked, exc.code)
            history = [_failed(app_id, claim.runner_id, masked, exc)]
            if isinstance(exc, CodeAlreadyUsed):
                return Handled(_error(rid, exc), outcome="failure", history=history)
            await self.limits.refund_budget(member)
            if isinstance(exc, RunnerOffline):
                raise
            return Handled(_error(rid, exc), history=history)
        session = opened.session
        await self.store.index_session(session, idle_ttl_s=s.pairing_session_idle_ttl_s)
        await self.store.schedule_expiry(
            session, idle_ttl_s=s.pairing_session_idle_ttl_s, shards=s.pairing_index_shards
        )
        await self.limits.refund_budget(member)
        drop = ""
        if opened.replaced is not None:
            drop = opened.replaced.session_id
            await self.store.drop_session_indexes([opened.replaced])
        log.info(
            "paired app=%s runner=%s session=%s code=%s",
            app_id,
            session.runner_id,
            session.session_id,
            masked,
        )
        result = {
            "session": session.to_wire(),
            "runner_public_key": opened.runner_public_key,
            "runner_metadata": opened.runner_metadata,
        }
        history = [
            PairingHistoryEntry(
                event="pair.succeeded",
                at_ms=session.created_at_ms,
                runner_id=session.runner_id,
                app_id=app_id,
                session_id=session.session_id,
                code_mask=masked,
            )
        ]
        return Handled(
            ok_reply(rid, result),
            outbox=opened.outbox,
            history=history,
            outcome="success",
            index_session=session,
            drop_session_id=drop,
        )

    async def runner_sessions(self, runner_id: str) -> list[PairingSession]:
        """Active sessions of a runner (refreshing their last_seen_at).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return await self.store.runner_sessions(
            runner_id, idle_ttl_s=self.settings.pairing_session_idle_ttl_s
        )

    async def app_sessions(self, app_id: str) -> list[PairingSession]:
        """Active sessions of an app (refreshing their last_seen_at).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return await self.store.app_sessions(
            app_id, idle_ttl_s=self.settings.pairing_session_idle_ttl_s
        )

    async def close_for_runner(
        self,
        runner_id: str,
        *,
        session_id: str | None = None,
        app_id: str | None = None,
        reason: ClosedReason = ClosedReason.UNPAIRED_BY_RUNNER,
    ) -> tuple[list[PairingSession], list[OutboxEntry]]:
        """Close one session, those with one app, or all of a runner's sessions.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return await self.store.close_sessions(
            runner_id, session_id=session_id, app_id=app_id, reason=reason
        )

    async def close_for_app(
        self, app_id: str, session_id: str
    ) -> tuple[list[PairingSession], list[OutboxEntry]]:
        """Close one of the app's own sessions.

        Raises:
            SessionNotFound: no such session, or not the app's.
            StoreUnavailable: Redis is unreachable.
        """
        runner_id = await self.store.app_session_runner(app_id, session_id)
        if runner_id is None:
            found = await self.store.find_session(session_id)
            if found is None or found[1] != app_id:
                raise SessionNotFound
            runner_id = found[0]
        closed, outbox = await self.store.close_sessions(
            runner_id,
            session_id=session_id,
            owner_app_id=app_id,
            reason=ClosedReason.UNPAIRED_BY_APP,
        )
        if not closed:
            raise SessionNotFound
        return closed, outbox


def _failed(
    app_id: str, runner_id: str | None, masked: str, exc: PairingError
) -> PairingHistoryEntry:
    return PairingHistoryEntry(
        event="pair.failed",
        at_ms=0,
        app_id=app_id,
        runner_id=runner_id,
        code_mask=masked,
        error_code=exc.code,
    )
