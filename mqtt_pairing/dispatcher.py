"""Dispatcher: (identity, op, payload bytes) -> reply and events. No MQTT here.

Order of checks (docs/protocol.md "Payloads", "App pair"): the payload is parsed and validated
first (size before parsing; an invalid payload gets INVALID_REQUEST with request_id null
when it cannot be trusted), then the replay check, ban and limits in the identity's slot,
then the op. Errors are turned into error replies here and nowhere else: `PairingError`
into its code, a pydantic `ValidationError` into INVALID_REQUEST.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from mqtt_pairing.config import Settings
from mqtt_pairing.errors import (
    InternalError,
    InvalidRequest,
    PairingError,
    PairingErrorCode,
    SessionNotFound,
    StoreUnavailable,
)
from mqtt_pairing.models import (
    AppUnpairRequest,
    CodeRequest,
    HeartbeatRequest,
    MessageRequest,
    PairingHistoryEntry,
    PairRequest,
    RunnerUnpairRequest,
    SimpleRequest,
    error_reply,
    ok_reply,
)
from mqtt_pairing.payload import InvalidPayload, extract_request_id, parse_payload
from mqtt_pairing.services.codes import PairingCodeService
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.history import PairingHistoryService
from mqtt_pairing.services.messages import MessageRelay
from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.services.ratelimit import IDEMPOTENT_OPS, RateLimitService
from mqtt_pairing.services.sessions import PairingSessionService
from mqtt_pairing.store.redis_store import (
    Begin,
    Mismatch,
    OutboxEntry,
    PairingStore,
    Pending,
    Replay,
)
from mqtt_pairing.topics import APP_OPS, RUNNER_OPS, Identity, Kind, ops_for

log = logging.getLogger(__name__)

_WRAPPED = IDEMPOTENT_OPS - {("app", "pair")}
"""Ops whose idempotency the dispatcher handles; `pair` batches it with its own steps."""

_PENDING_POLL_S = 0.05

UNKNOWN_OP = "unknown"
"""What replies to an op of neither kind are counted under: a client names ops, and the
metrics' label values must stay a bounded set."""
_KNOWN_OPS = RUNNER_OPS | APP_OPS

_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
"""`json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, one encoder."""

Handler = Callable[[Identity, Any, Begin | None, str], Awaitable[Handled]]
"""An op: (requester, request model, what the app slot said, payload hash) -> Handled."""


def _unavailable(reply: dict[str, Any] | None) -> bool:
    """Whether `reply` is a SERVICE_UNAVAILABLE error reply."""
    if reply is None or reply.get("ok"):
        return False
    error = reply.get("error")
    return isinstance(error, dict) and error.get("code") == PairingErrorCode.SERVICE_UNAVAILABLE


def payload_hash(obj: dict[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of a request.

    A retry with its keys in another order is the same request.
    """
    return hashlib.sha256(_CANONICAL_JSON.encode(obj).encode()).hexdigest()


class Dispatcher:
    """Turns one request into a reply and events.

    Args:
        store: the Redis store.
        settings: all settings.
        secret: `PAIRING_SECRET` as bytes.

    Attributes:
        counters: what happened, by name (e.g. `invalid_request`, `reply.CODE_NOT_FOUND`).
        replies: replies by (op, `ok` or error code), for the metrics; ops of neither
            kind are counted as `UNKNOWN_OP`, so the label values are a bounded set.
    """

    def __init__(self, store: PairingStore, settings: Settings, secret: bytes) -> None:
        self.store = store
        self.settings = settings
        self.limits = RateLimitService(store, settings)
        self.codes = PairingCodeService(store, settings, secret)
        self.history = PairingHistoryService(store, settings)
        self.sessions = PairingSessionService(
            store, settings, self.codes, self.limits, self.history
        )
        self.messages = MessageRelay(store, settings)
        self.counters: Counter[str] = Counter()
        self.replies: Counter[tuple[str, str]] = Counter()
        self._routes: dict[tuple[Kind, str], tuple[type[BaseModel], Handler]] = {
            (Kind.RUNNER, "code"): (CodeRequest, self._code),
            (Kind.RUNNER, "cancel-code"): (SimpleRequest, self._cancel_code),
            (Kind.RUNNER, "sessions"): (SimpleRequest, self._runner_sessions),
            (Kind.RUNNER, "unpair"): (RunnerUnpairRequest, self._runner_unpair),
            (Kind.RUNNER, "heartbeat"): (HeartbeatRequest, self._heartbeat),
            (Kind.RUNNER, "message"): (MessageRequest, self._message),
            (Kind.APP, "pair"): (PairRequest, self._pair),
            (Kind.APP, "sessions"): (SimpleRequest, self._app_sessions),
            (Kind.APP, "unpair"): (AppUnpairRequest, self._app_unpair),
            (Kind.APP, "status"): (SimpleRequest, self._status),
            (Kind.APP, "message"): (MessageRequest, self._message),
        }

    async def handle(
        self, identity: Identity, op: str, payload: bytes, *, defer: bool = False
    ) -> Handled:
        """Handle one request; never raises for bad input.

        Args:
            identity: the requester, from the topic (trusted: the broker binds it).
            op: the op segment of the topic (already matching the op pattern).
            payload: the raw MQTT payload.
            defer: leave the op's closing calls in `Handled.after` for the caller, who
                publishes the reply and events first and then runs them in the round trip
                that deletes the outbox entries (`OutboxRelay.deliver`: what the gateway
                does). Without it they run here, before the reply is returned.

        Returns:
            The reply (None for a successful heartbeat) and events to publish.
        """
        request_id: str | None = None
        try:
            try:
                obj = parse_payload(payload)
            except InvalidPayload as exc:
                request_id = exc.request_id
                raise
            request_id = extract_request_id(obj)
            route = self._routes.get((identity.kind, op))
            if route is None or op not in ops_for(identity.kind):
                raise InvalidRequest("unknown op")
            model, handler = route
            if request_id is None and not (op == "heartbeat" and "request_id" not in obj):
                raise InvalidRequest("request_id is missing or invalid")
            try:
                req = model.model_validate(obj)
            except ValidationError:
                raise InvalidRequest(_validation_message(model)) from None
            # Only the ops with effects compare copies of a request (heartbeats, listings
            # and messages skip the hash: a heartbeat's cost is mostly its round trip).
            key = (identity.kind.value, op)
            phash = payload_hash(obj) if key in IDEMPOTENT_OPS else ""
            if key in _WRAPPED:
                assert request_id is not None  # noqa: S101 - checked above
                handled = await self._attempt(
                    identity,
                    op,
                    request_id,
                    self._idempotent(identity, op, request_id, phash, req, handler),
                )
            elif key in IDEMPOTENT_OPS and request_id is not None:
                handled = await self._attempt(
                    identity, op, request_id, handler(identity, req, None, phash)
                )
            else:
                handled = await handler(identity, req, None, phash)
        except PairingError as exc:
            handled = Handled(error_reply(request_id, exc.code, exc.message, exc.retry_after_s))
        except Exception:
            log.exception("unexpected error handling %s %s/%s", op, identity.kind, identity.id)
            exc2 = InternalError()
            handled = Handled(error_reply(request_id, exc2.code, exc2.message))
        if handled.after and not defer:
            try:
                await self.store.batch(handled.after)
            except PairingError as exc:
                log.warning("request not finished: %s", exc.message)
            handled.after = []
        self._count(op, handled)
        return handled

    async def _attempt(
        self, identity: Identity, op: str, request_id: str, work: Awaitable[Handled]
    ) -> Handled:
        """Await an idempotent op's `work`, noted in `limits.attempts` while it runs.

        An attempt that ends in SERVICE_UNAVAILABLE (raised, or as its reply) is
        remembered as abandoned: its pending mark may still be written when Redis
        answers again (services/attempts.py).

        Raises:
            Whatever `work` raises.
        """
        attempts = self.limits.attempts
        key = self.limits.attempt_key(identity, op, request_id)
        loop = asyncio.get_running_loop()
        attempts.start(key)
        try:
            handled = await work
        except BaseException as exc:
            attempts.end(key, abandoned=isinstance(exc, StoreUnavailable), now_s=loop.time())
            raise
        attempts.end(key, abandoned=_unavailable(handled.reply), now_s=loop.time())
        return handled

    def _count(self, op: str, handled: Handled) -> None:
        if op not in _KNOWN_OPS:
            op = UNKNOWN_OP
        reply = handled.reply
        if reply is None or reply.get("ok"):
            self.counters[f"ok.{op}"] += 1
            self.replies[(op, "ok")] += 1
        else:
            self.counters[f"error.{reply['error']['code']}"] += 1
            self.replies[(op, str(reply["error"]["code"]))] += 1

    async def _idempotent(
        self,
        identity: Identity,
        op: str,
        request_id: str,
        phash: str,
        req: Any,  # noqa: ANN401 - the op's request model
        handler: Handler,
    ) -> Handled:
        deadline = asyncio.get_running_loop().time() + self.settings.pairing_pending_lease_s + 1
        while True:
            begun = await self.limits.begin(identity, op, request_id, phash)
            if isinstance(begun, Replay):
                return Handled(self._open_replay(identity, op, request_id, begun.reply))
            if isinstance(begun, Mismatch):
                raise InvalidRequest("request_id was used with another payload")
            if isinstance(begun, Begin):
                break
            assert isinstance(begun, Pending)  # noqa: S101 - the last variant
            now = asyncio.get_running_loop().time()
            key = self.limits.attempt_key(identity, op, request_id)
            if self.limits.attempts.take_over(key, now_s=now):
                # An attempt this instance gave up on wrote the mark when Redis woke up.
                await self.limits.finish(identity, op, request_id, reply=None)
                continue
            if now > deadline:
                raise InternalError
            await asyncio.sleep(_PENDING_POLL_S)
        try:
            handled = await handler(identity, req, begun, phash)
        except PairingError as exc:
            handled = Handled(error_reply(request_id, exc.code, exc.message, exc.retry_after_s))
        except BaseException:
            await self._forget(identity, op, request_id)
            raise
        reply = handled.reply
        assert reply is not None  # noqa: S101 - ops with effects always reply
        remembered = reply["ok"] or PairingErrorCode(reply["error"]["code"]).is_remembered
        if handled.remember or not remembered or handled.outcome:
            penalty_s = await self.limits.finish(
                identity,
                op,
                request_id,
                reply=json.dumps(reply) if remembered and handled.remember else None,
                outcome=handled.outcome,
                allowlisted=begun.allowlisted,
                begun=begun,
            )
            if penalty_s:
                handled.history.append(
                    PairingHistoryEntry(
                        event="penalty",
                        at_ms=0,
                        app_id=identity.id,
                        detail=f"retry_after_s={penalty_s}",
                    )
                )
        return handled

    async def _forget(self, identity: Identity, op: str, request_id: str) -> None:
        try:
            await self.limits.finish(identity, op, request_id, reply=None)
        except PairingError:
            log.warning("could not drop the pending mark of a failed request")

    def _open_replay(self, identity: Identity, op: str, request_id: str, stored: str) -> Any:  # noqa: ANN401
        if identity.kind is Kind.RUNNER and op == "code":
            stored = self.codes.open_remembered(identity.id, request_id, stored)
        self.counters["replay"] += 1
        return json.loads(stored)

    # ---- runner ops -------------------------------------------------------------------

    async def _code(
        self, identity: Identity, req: CodeRequest, _b: Begin | None, _phash: str
    ) -> Handled:
        issued, masked = await self.codes.issue(identity.id, req)
        record = PairingHistoryEntry(
            event="code.issued",
            at_ms=issued.expires_at_ms - issued.ttl_s * 1000,
            runner_id=identity.id,
            code_mask=masked,
            detail=f"ttl_s={issued.ttl_s} max_uses={issued.max_uses}",
        )
        return Handled(ok_reply(req.request_id, issued.to_wire()), remember=False, history=[record])

    async def _cancel_code(
        self,
        identity: Identity,
        req: SimpleRequest,
        _b: Begin | None,
        _phash: str,
    ) -> Handled:
        cancelled = await self.codes.cancel(identity.id)
        history = []
        if cancelled:
            history.append(
                PairingHistoryEntry(event="code.cancelled", at_ms=0, runner_id=identity.id)
            )
        return Handled(ok_reply(req.request_id, {"cancelled": cancelled}), history=history)

    async def _runner_sessions(
        self,
        identity: Identity,
        req: SimpleRequest,
        _b: Begin | None,
        _phash: str,
    ) -> Handled:
        found = await self.sessions.runner_sessions(identity.id)
        return Handled(ok_reply(req.request_id, {"sessions": [s.to_wire() for s in found]}))

    async def _runner_unpair(
        self,
        identity: Identity,
        req: RunnerUnpairRequest,
        _b: Begin | None,
        _phash: str,
    ) -> Handled:
        given = [req.session_id is not None, req.app_id is not None, req.all is True]
        if sum(given) != 1:
            raise InvalidRequest("give exactly one of session_id, app_id, all: true")
        closed, outbox = await self.sessions.close_for_runner(
            identity.id, session_id=req.session_id, app_id=req.app_id
        )
        if req.session_id is not None and not closed:
            raise SessionNotFound
        return Handled(ok_reply(req.request_id, {"closed": len(closed)}), outbox=outbox)

    async def _heartbeat(
        self,
        identity: Identity,
        _req: HeartbeatRequest,
        _b: Begin | None,
        _phash: str,
    ) -> Handled:
        outbox = await self.store.heartbeat(
            identity.id,
            idle_ttl_s=self.settings.pairing_session_idle_ttl_s,
            heartbeat_online_s=self.settings.pairing_heartbeat_online_s,
            announce_max=self.settings.pairing_presence_announce_max,
            announce_window_s=self.settings.pairing_presence_announce_window_s,
        )
        return Handled(None, outbox=outbox)

    async def handle_status(
        self,
        runner_id: str,
        payload: bytes,
        *,
        retained: bool,
        held: Callable[[float], object] | None = None,
    ) -> Handled:
        """Record a runner's status message (`P/runners/{id}/status`); never raises.

        A payload that is not `{"state": "online"|"offline"}` is counted and ignored (no
        reply: the status topic has no reply topic). A change past
        `PAIRING_PRESENCE_ANNOUNCE_MAX` per `PAIRING_PRESENCE_ANNOUNCE_WINDOW_S` is not
        announced: `held(delay_s)` is called, and `announce_held` then announces the
        presence of that time (docs/protocol.md "Events").
        """
        try:
            obj = parse_payload(payload)
            state = obj.get("state")
            if state not in ("online", "offline"):
                raise InvalidRequest("state must be online or offline")
            outbox = await self._record_status(runner_id, state, retained=retained, held=held)
        except PairingError as exc:
            self.counters[f"status.{exc.code}"] += 1
            return Handled(None)
        self.counters["status"] += 1
        return Handled(None, outbox=outbox)

    async def _record_status(
        self,
        runner_id: str,
        state: Literal["online", "offline", ""],
        *,
        retained: bool,
        held: Callable[[float], object] | None,
    ) -> list[OutboxEntry]:
        """`store.record_status` with the presence settings ("" state: announce only)."""
        return await self.store.record_status(
            runner_id,
            state,
            retained=retained,
            heartbeat_online_s=self.settings.pairing_heartbeat_online_s,
            idle_ttl_s=self.settings.pairing_session_idle_ttl_s,
            announce_max=self.settings.pairing_presence_announce_max,
            announce_window_s=self.settings.pairing_presence_announce_window_s,
            held=held,
        )

    async def announce_held(
        self, runner_id: str, *, held: Callable[[float], object] | None = None
    ) -> Handled:
        """Announce a runner's recorded presence if a change of it was held back.

        What `handle_status`'s `held` callback schedules once the window allows
        (docs/protocol.md "Events"); `held` again if it still does not. Never raises.
        """
        try:
            outbox = await self._record_status(runner_id, "", retained=False, held=held)
        except PairingError as exc:
            self.counters[f"status.{exc.code}"] += 1
            return Handled(None)
        return Handled(None, outbox=outbox)

    # ---- runner and app ops -----------------------------------------------------------

    async def _message(
        self, identity: Identity, req: MessageRequest, _b: Begin | None, _phash: str
    ) -> Handled:
        event = await self.messages.relay(identity, req)
        return Handled(ok_reply(req.request_id, {"sent": True}), relay=[event])

    # ---- app ops ----------------------------------------------------------------------

    async def _pair(
        self, identity: Identity, req: PairRequest, _b: Begin | None, phash: str
    ) -> Handled:
        return await self.sessions.pair(identity.id, req, phash)

    async def _app_sessions(
        self,
        identity: Identity,
        req: SimpleRequest,
        _b: Begin | None,
        _phash: str,
    ) -> Handled:
        found = await self.sessions.app_sessions(identity.id)
        return Handled(ok_reply(req.request_id, {"sessions": [s.to_wire() for s in found]}))

    async def _app_unpair(
        self,
        identity: Identity,
        req: AppUnpairRequest,
        _b: Begin | None,
        _phash: str,
    ) -> Handled:
        closed, outbox = await self.sessions.close_for_app(identity.id, req.session_id)
        return Handled(ok_reply(req.request_id, {"closed": len(closed)}), outbox=outbox)

    async def _status(
        self, identity: Identity, req: SimpleRequest, _b: Begin | None, _phash: str
    ) -> Handled:
        found = await self.sessions.app_sessions(identity.id)
        online = await self.store.presence(
            [s.runner_id for s in found],
            heartbeat_online_s=self.settings.pairing_heartbeat_online_s,
        )
        runners = [
            {
                "runner_id": s.runner_id,
                "online": online.get(s.runner_id),
                "session_id": s.session_id,
            }
            for s in found
        ]
        return Handled(ok_reply(req.request_id, {"paired": bool(found), "runners": runners}))


def _validation_message(model: type[BaseModel]) -> str:
    # pydantic's own messages may quote the input; say only which request was refused.
    name = model.__name__.removesuffix("Request").lower() or "request"
    return f"invalid fields in the {name} request"


__all__ = ["Dispatcher", "Event", "Handled", "payload_hash"]
