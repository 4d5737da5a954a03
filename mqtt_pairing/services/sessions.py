"""PairingSessionService: pair, list, unpair (docs/protocol.md "App pair", "Other ops").

A pair crosses slots as docs/design.md "A pair across slots" lays out; the app-slot steps
(replay, ban, limits; remembering the reply) are the dispatcher's and RateLimitService's,
this service runs the budget, code, runner and by-id steps in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any, Literal, Protocol

from mqtt_pairing.codes import mask_code, normalise_code
from mqtt_pairing.config import Settings
from mqtt_pairing.errors import (
    CodeAlreadyUsed,
    CodeExpired,
    CodeNotFound,
    InternalError,
    InvalidCodeFormat,
    InvalidRequest,
    PairingError,
    RunnerOffline,
    SessionLimitReached,
    SessionNotFound,
    StoreUnavailable,
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
from mqtt_pairing.services.history import PairingHistoryService
from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.services.ratelimit import RateLimitService
from mqtt_pairing.store.redis_store import (
    Begin,
    Call,
    Claim,
    ClaimBusy,
    Mismatch,
    OutboxEntry,
    PairingStore,
    Pending,
    Replay,
)
from mqtt_pairing.topics import Identity, Kind

log = logging.getLogger(__name__)

_PENDING_POLL_S = 0.05


def new_session_id() -> str:
    """A fresh session id: a random UUID (122 bits), as text."""
    return str(uuid.uuid4())


def _error(request_id: str, exc: PairingError) -> dict[str, object]:
    return error_reply(request_id, exc.code, exc.message, exc.retry_after_s)


class PresenceView(Protocol):
    """How fresh the recorded presence is (`mqtt_pairing.presence.PresenceRecorder`)."""

    async def refreshed(self, runner_id: str) -> bool:
        """True once a stale record of the runner has been refreshed: try again."""
        ...


class _RecordIsCurrent:
    """Without a presence connection (no gateway), every record counts as fresh."""

    async def refreshed(self, runner_id: str) -> bool:
        return False


class PairingSessionService:
    """Opens, lists and closes pairing sessions.

    Args:
        store: the Redis store.
        settings: session limit and idle TTL (seconds).
        codes: digests of codes.
        limits: the failure budget.

    Attributes:
        presence: whether a runner's recorded presence is fresh; the gateway sets its
            presence recorder here. A `pair` refused RUNNER_OFFLINE on a stale record
            waits for it to be refreshed and opens once more (docs/protocol.md "Presence").
    """

    def __init__(
        self,
        store: PairingStore,
        settings: Settings,
        codes: PairingCodeService,
        limits: RateLimitService,
        history: PairingHistoryService,
    ) -> None:
        self.store = store
        self.settings = settings
        self.codes = codes
        self.limits = limits
        self.history = history
        self.presence: PresenceView = _RecordIsCurrent()

    async def pair(self, app_id: str, req: PairRequest, payload_hash: str) -> Handled:
        """A whole `pair`, in three Redis round trips when it succeeds, two when it fails.

        docs/design.md "A pair across slots", with the independent steps batched:
        1. app slot (replay, ban, limits, pending mark) + budget shard (reserve a unit) +
           code slot (claim a use), in one batch. The claim is speculative: when the app
           slot or the budget refuses, its outcome is never told and the use is given back.
        2. runner slot: open the session (outbox: session.opened, code.used), in one batch
           with the outbox's due mark and the app's session indexes.
        3. once the reply and events are out (`Handled.after`, run by the caller in the
           round trip that deletes the outbox entries): app slot (remember the reply,
           clear the failure window) + code slot (settle the claim) + expiry set + budget
           refund + history.
        A failed guess ends with step 1 and a batch remembering it (and the penalty).
        Every step is idempotent for the same (app_id, request_id): a retry or redelivery
        after a crash ends with the same session_id, and a copy that arrives between the
        reply and step 3 waits for the remembered reply (the pending mark).

        Returns:
            The reply, with `remember` False: the request finishes itself (a failure) or
            through `after` (a success).

        Raises:
            Banned, RateLimited: refused before the lookup (not remembered).
            RunnerOffline: the runner is known to be offline (not remembered).
            InvalidRequest: the request_id was used with another payload.
            StoreUnavailable: Redis is unreachable.
        """
        identity = Identity(Kind.APP, app_id)
        rid = req.request_id
        member = self.limits.budget_member(app_id, rid)
        try:
            code: str | None = normalise_code(req.code)
        except InvalidCodeFormat:
            code = None
        digest = self.codes.digest(code) if code is not None else ""
        calls: list[Call] = [
            self.limits.begin_call(identity, "pair", rid, payload_hash),
            self.limits.budget_call(member, peek=code is None),
        ]
        if code is not None:
            calls.append(
                self.store.claim_call(
                    digest, app_id, rid, new_session_id(), self.settings.tombstones
                )
            )
        res = await self.store.batch(calls)
        claim, claim_error = self._parse_claim(res[2]) if code is not None else (None, None)
        claim_new = claim is not None and not claim.repeat
        budget_refused: PairingError | None = None
        try:
            own_unit = member if self.store.parse_budget(res[1]) else None
        except PairingError as exc:
            own_unit, budget_refused = None, exc
        try:
            begun = self.store.parse_begin(res[0])
        except PairingError:
            # Refused before the lookup: the speculative steps are undone unseen.
            await self._give_back(digest, identity, rid, claim_new, budget=own_unit)
            raise
        if isinstance(begun, Pending):
            # Another copy is in progress. Steps it already took are its own (same app_id
            # and request_id); what this copy added is given back unless the first copy
            # ends well (it then used them as its own).
            return await self._await_copy(identity, req, payload_hash, claim_new, own_unit)
        if not isinstance(begun, Begin):
            await self._give_back(digest, identity, rid, claim_new, budget=own_unit)
            if isinstance(begun, Replay):
                return Handled(json.loads(begun.reply), remember=False)
            raise InvalidRequest("request_id was used with another payload")
        if budget_refused is not None:
            await self._give_back(
                digest, identity, rid, claim_new, budget=None, forget=True, begun=begun
            )
            raise budget_refused
        try:
            return await self._after_begin(identity, req, begun, code, digest, claim, claim_error)
        except StoreUnavailable:
            # Drop the pending mark if Redis lets us, so that the app's retry (after
            # retry_after_s) is not held back behind this dead attempt; the steps are
            # idempotent, so the retry ends the same way.
            with contextlib.suppress(PairingError):
                await self.limits.finish(identity, "pair", rid, reply=None, begun=begun)
            raise

    async def _after_begin(
        self,
        identity: Identity,
        req: PairRequest,
        begun: Begin,
        code: str | None,
        digest: str,
        claim: Claim | None,
        claim_error: PairingError | None,
    ) -> Handled:
        app_id, rid = identity.id, req.request_id
        member = self.limits.budget_member(app_id, rid)
        if code is None:
            return await self._finish(identity, rid, _error(rid, InvalidCodeFormat()), begun=begun)
        # The first batch's Redis time serves the open while it is fresh: a claim taken
        # in that batch (not one asked again while another settled, up to 2 s later).
        now_ms: int | None = begun.now_ms if claim is not None else None
        if claim is None and claim_error is None:  # busy: a claim in flight decides
            try:
                claim = await self.store.claim_code(
                    digest, app_id, rid, new_session_id(), self.settings.tombstones
                )
            except (CodeNotFound, CodeExpired, CodeAlreadyUsed) as exc:
                claim_error = exc
        if claim is None:
            assert claim_error is not None  # noqa: S101
            guessed = mask_code(code[0], digest)
            log.info("pair failed app=%s code=%s error=%s", app_id, guessed, claim_error.code)
            return await self._finish(
                identity,
                rid,
                _error(rid, claim_error),
                outcome="failure",
                begun=begun,
                history=[_failed(app_id, None, guessed, claim_error)],
            )
        fault_point("after_claim")
        return await self._open(identity, req, begun, digest, claim, member, now_ms)

    def _parse_claim(self, res: Any) -> tuple[Claim | None, PairingError | None]:  # noqa: ANN401
        """The claim of the first batch: (claim, None) or (None, lookup error).

        (None, None) means busy: a claim in flight must settle first.
        """
        try:
            return self.store.parse_claim(res), None
        except ClaimBusy:
            return None, None
        except PairingError as exc:
            return None, exc

    async def _open(
        self,
        identity: Identity,
        req: PairRequest,
        begun: Begin,
        digest: str,
        claim: Claim,
        member: str,
        now_ms: int | None,
    ) -> Handled:
        app_id, rid, s = identity.id, req.request_id, self.settings
        masked = mask_code(claim.first_char, digest)
        idle_ttl_s, shards = s.pairing_session_idle_ttl_s, s.pairing_index_shards
        sid, runner_id = claim.session_id, claim.runner_id

        # Written with the open, before it: the due mark (a crash after the open leaves
        # nothing undelivered), the app's indexes (the app finds the session as soon as
        # it has the reply) and the idle deadline (nothing is left that only a retry
        # cleans up). A refused open removes the indexes; readers and the sweep skip
        # entries whose session is not open.
        # `now`: Redis time read by this request's first batch (the marks are then plain
        # ZADDs and the open reads no TIME), or None: each script reads it.
        def plan(now: int | None) -> list[Call]:
            return [
                *self.store.open_marks_calls(
                    runner_id,
                    sid,
                    lease_s=s.pairing_outbox_lease_s,
                    idle_ttl_s=idle_ttl_s,
                    shards=shards,
                    now_ms=now,
                ),
                self.store.app_index_call(app_id, sid, runner_id, idle_ttl_s=idle_ttl_s),
                self.store.by_id_call(sid, runner_id, app_id, idle_ttl_s=idle_ttl_s),
                open_call(now),
            ]

        def open_call(now: int | None) -> Call:
            return self.store.open_call(
                digest=digest,
                session_id=sid,
                runner_id=runner_id,
                app_id=app_id,
                app_name=req.app_name,
                idle_ttl_s=idle_ttl_s,
                max_sessions=s.pairing_max_sessions_per_runner,
                uses_left=claim.uses_left,
                app_public_key=req.public_key,
                app_metadata=req.metadata,
                code_mask=masked,
                history_max_len=s.pairing_history_identity_max_len,
                history_retention_s=s.pairing_history_retention_s,
                now_ms=now,
            )

        res = await self.store.batch(plan(now_ms))
        try:
            try:
                opened = self.store.parse_open(runner_id, res[-1])
            except RunnerOffline:
                # Known offline, perhaps from a stale record (the presence connection
                # reconciling after a restart): once it is fresh, the same batch again
                # (every call in it is idempotent; the claim is held meanwhile).
                if not await self.presence.refreshed(runner_id):
                    raise
                log.info("pair tried again app=%s runner=%s: presence refreshed", app_id, runner_id)
                res = await self.store.batch(plan(None))  # seconds later: Redis time anew
                opened = self.store.parse_open(runner_id, res[-1])
        except (CodeAlreadyUsed, RunnerOffline, SessionLimitReached) as exc:
            log.info("pair refused app=%s code=%s error=%s", app_id, masked, exc.code)
            history = [_failed(app_id, runner_id, masked, exc)]
            undo: list[Call] = [
                self.store.unclaim_call(digest, app_id, rid),
                *self.store.drop_index_calls_by_id(sid, app_id),
                self.store.unschedule_expiry_call(runner_id, sid, shards=shards),
            ]
            if not isinstance(exc, CodeAlreadyUsed):
                undo.append(self.limits.refund_call(member))  # the right code: no failure
            if isinstance(exc, RunnerOffline):
                forget = self.limits.finish_call(identity, "pair", rid, reply=None, begun=begun)
                await self.store.batch([*undo, forget])
                await self.history.record(history)
                raise
            outcome: Literal["", "failure"] = "failure" if isinstance(exc, CodeAlreadyUsed) else ""
            return await self._finish(
                identity,
                rid,
                _error(rid, exc),
                outcome=outcome,
                begun=begun,
                history=history,
                before=undo,
            )
        session = opened.session
        result = {
            "session": session.to_wire(),
            "runner_public_key": opened.runner_public_key,
            "runner_metadata": opened.runner_metadata,
        }
        reply = ok_reply(rid, result)
        # One record, pair.succeeded (the session opened): open_session wrote it to the
        # runner's stream; the global and app streams get it with the finish, once: not
        # by a retry that finds the session open, and not by the outbox delivery of this
        # request (`recorded`); a delivery by another (the sweep after a crash) writes it
        # from the outbox entry.
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
        history_calls = self.history.calls(
            history, streams=("global", "app"), now_ms=session.created_at_ms
        )
        # What finishes the pair once the reply is out: the caller runs it in the round
        # trip that deletes the outbox entries (Handled.after). A retry meanwhile finds
        # the request pending and waits for the remembered reply.
        after: list[Call] = [
            self.store.settle_claim_call(digest, app_id, rid),
            self.limits.finish_call(
                identity,
                "pair",
                rid,
                reply=json.dumps(reply),
                outcome="success",
                allowlisted=begun.allowlisted,
                begun=begun,
            ),
            self.limits.refund_call(member),
            *([] if opened.repeat else history_calls),
        ]
        if opened.replaced is not None:
            after.extend(self.store.drop_index_calls([opened.replaced]))
        log.info(
            "paired app=%s runner=%s session=%s code=%s",
            app_id,
            session.runner_id,
            session.session_id,
            masked,
        )
        # A repeat (a retry or redelivery after the first attempt died) leaves the events
        # the first attempt wrote to the due mark, which batch 2 renewed: after a crash
        # the restarted instance's recovery may be publishing them right now, and two
        # publishers would put two copies on the wire.
        return Handled(
            reply,
            remember=False,
            outbox=[] if opened.repeat else opened.outbox,
            outbox_marked=True,
            after=after,
            recorded=frozenset({"session.opened"}),
        )

    async def _finish(
        self,
        identity: Identity,
        rid: str,
        reply: dict[str, Any],
        *,
        outcome: Literal["", "failure", "success"] = "",
        begun: Begin | None = None,
        history: list[PairingHistoryEntry] | None = None,
        before: Sequence[Call] = (),
        after: Sequence[Call] = (),
    ) -> Handled:
        """Remember the reply (with the guess's outcome) in one batch with other steps."""
        records = list(history or [])
        finish = self.limits.finish_call(
            identity,
            "pair",
            rid,
            reply=json.dumps(reply),
            outcome=outcome,
            allowlisted=begun is not None and begun.allowlisted,
            begun=begun,
        )
        res = await self.store.batch([*before, finish, *after, *self.history.calls(records)])
        penalty_s, _strikes = self.store.parse_finish(res[len(before)])
        if penalty_s:
            records = [
                PairingHistoryEntry(
                    event="penalty",
                    at_ms=0,
                    app_id=identity.id,
                    detail=f"retry_after_s={penalty_s}",
                )
            ]
            await self.history.record(records)
        return Handled(reply, remember=False)

    async def _give_back(
        self,
        digest: str,
        identity: Identity,
        rid: str,
        claim_new: bool,
        *,
        budget: str | None,
        forget: bool = False,
        begun: Begin | None = None,
    ) -> None:
        """Undo the speculative steps of a refused request (it learns nothing of them).

        `forget` drops its pending mark (and, with `begun`, its guess in flight).
        """
        undo: list[Call] = []
        if claim_new:
            undo.append(self.store.unclaim_call(digest, identity.id, rid))
        if budget is not None:
            undo.append(self.limits.refund_call(budget))
        if forget:
            undo.append(self.limits.finish_call(identity, "pair", rid, reply=None, begun=begun))
        await self.store.batch(undo)

    async def _await_copy(
        self,
        identity: Identity,
        req: PairRequest,
        payload_hash: str,
        claim_new: bool,
        own_unit: str | None,
    ) -> Handled:
        """Wait for a copy of this request in progress; take over if it died."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.pairing_pending_lease_s + 1
        rid = req.request_id
        digest = self.codes.digest(req.code) if _is_code(req.code) else ""
        key = self.limits.attempt_key(identity, "pair", rid)
        if self.limits.attempts.take_over(key, now_s=loop.time()):
            # The mark is an attempt's this instance gave up on (SERVICE_UNAVAILABLE),
            # written when Redis woke up: nobody works on it. Its steps are this copy's.
            await self.limits.finish(identity, "pair", rid, reply=None)
            return await self.pair(identity.id, req, payload_hash)
        while loop.time() < deadline:
            await asyncio.sleep(_PENDING_POLL_S)
            begun = await self.limits.begin(identity, "pair", rid, payload_hash)
            if isinstance(begun, Replay):
                reply = json.loads(begun.reply)
                if not reply.get("ok"):
                    # The first copy gave its use back (or never had one): a use or unit
                    # this copy took meanwhile is nobody's.
                    await self._give_back(digest, identity, rid, claim_new, budget=own_unit)
                return Handled(reply, remember=False)
            if isinstance(begun, Mismatch):
                raise InvalidRequest("request_id was used with another payload")
            if isinstance(begun, Begin):
                # The first copy died: its pending mark lapsed and this one owns it now.
                # The steps are idempotent, so running them again ends the same way.
                await self.limits.finish(identity, "pair", rid, reply=None)
                return await self.pair(identity.id, req, payload_hash)
        raise InternalError

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


def _is_code(raw: str) -> bool:
    try:
        normalise_code(raw)
    except InvalidCodeFormat:
        return False
    return True


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
