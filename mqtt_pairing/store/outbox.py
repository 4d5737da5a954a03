"""Outbox and presence: runners' outbox streams, due marks, heartbeats and statuses.

See docs/design.md "Delivery" and docs/protocol.md "Presence".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mqtt_pairing import policy
from mqtt_pairing.models import PairingSession
from mqtt_pairing.store.keys import (
    MS_PER_S,
    SESSION_KEYS_MARGIN_S,
    glob_escape,
    session_keys_ttl_ms,
)
from mqtt_pairing.store.transport import (
    Call,
    RawCall,
    ScriptCall,
    Transport,
)

PRESENCE_ANNOUNCE_MAX = 4
"""Presence changes announced at most per window per runner (`PAIRING_PRESENCE_ANNOUNCE_MAX`)."""
PRESENCE_ANNOUNCE_WINDOW_S = 60
"""That window, s (`PAIRING_PRESENCE_ANNOUNCE_WINDOW_S`)."""


HEARTBEAT_RENEW_MS = SESSION_KEYS_MARGIN_S * MS_PER_S // 2
"""A heartbeat renews the TTLs of its runner's keys only when it has not for this long: they
still outlive the idle deadline of the sessions it refreshes by half the margin
(`SESSION_KEYS_MARGIN_S`), and a runner that beats every few seconds renews them twice a
day instead of with every beat."""


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
                session=parse_session(data["s"]) if data.get("s") else None,
                extra=json.loads(data.get("x") or "{}"),
                at_ms=int(data.get("at") or 0),
            )
        )
    return out


def parse_session(raw: str) -> PairingSession:
    """A session from its internal JSON form (as stored in the runner's sessions hash)."""
    return PairingSession.model_validate_json(raw)


OUTBOX_SCRIPTS = (
    "heartbeat",
    "record_status",
    "ack_outbox",
    "mark_due",
    "mark_open",
    "claim_due",
    "hold_lease",
)
"""The Lua scripts (store/lua/) of this aggregate."""


class OutboxStore(Transport):
    """Runners' outboxes (events to publish), due marks and presence records."""

    # ---- presence -----------------------------------------------------------------------

    def _runner_slot(self, runner_id: str) -> list[str]:
        """KEYS of the runner-slot scripts that may announce presence: hash, sessions, outbox."""
        k = self.keys
        return [k.runner(runner_id), k.runner_sessions(runner_id), k.outbox(runner_id)]

    async def heartbeat(
        self,
        runner_id: str,
        *,
        idle_ttl_s: int,
        heartbeat_online_s: int,
        announce_max: int = PRESENCE_ANNOUNCE_MAX,
        announce_window_s: int = PRESENCE_ANNOUNCE_WINDOW_S,
        renew_ms: int = HEARTBEAT_RENEW_MS,
    ) -> list[OutboxEntry]:
        """Record a runner heartbeat and refresh its sessions.

        The TTLs of the runner's keys are renewed only if no heartbeat did for `renew_ms`.

        A change is announced only within `announce_max` per `announce_window_s` per
        runner (docs/protocol.md "Events"); one held back is announced by a later
        heartbeat.

        Returns:
            The outbox entry the heartbeat wrote if it announced a change (offline to
            online), else an empty list.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "heartbeat",
            self._runner_slot(runner_id),
            [
                session_keys_ttl_ms(idle_ttl_s),
                heartbeat_online_s * MS_PER_S,
                announce_max,
                announce_window_s * MS_PER_S,
                renew_ms,
            ],
        )
        return parse_outbox(runner_id, res[1])

    async def record_status(
        self,
        runner_id: str,
        state: Literal["online", "offline", ""],
        *,
        retained: bool,
        heartbeat_online_s: int,
        idle_ttl_s: int,
        announce_max: int = PRESENCE_ANNOUNCE_MAX,
        announce_window_s: int = PRESENCE_ANNOUNCE_WINDOW_S,
        held: Callable[[float], object] | None = None,
    ) -> list[OutboxEntry]:
        """Record a runner's status message; announce a change between online and offline.

        At most `announce_max` changes are announced per `announce_window_s` per runner
        (docs/protocol.md "Events"). A change past them is recorded but held back:
        `held(delay_s)` is called with the seconds until the window allows one, when
        the caller calls this again with `state` "" (nothing recorded: the recorded
        presence is announced if it differs from the last announced). A replayed
        retained status (`retained`) that matches the record announces the same way.

        Returns:
            The outbox entry written if presence changed (runner.online/offline), else an
            empty list.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "record_status",
            self._runner_slot(runner_id),
            [
                state,
                int(retained),
                heartbeat_online_s * MS_PER_S,
                session_keys_ttl_ms(idle_ttl_s),
                announce_max,
                announce_window_s * MS_PER_S,
            ],
        )
        if held is not None and len(res) > 2 and int(res[2]) > 0:
            held(int(res[2]) / MS_PER_S)
        return parse_outbox(runner_id, res[1])

    async def presence(
        self, runner_ids: Sequence[str], *, heartbeat_online_s: int = 30
    ) -> dict[str, bool | None]:
        """Presence of runners by docs/protocol.md "Presence" (True, False, or None: unknown).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not runner_ids:
            return {}
        fields = ("status", "status_ms", "hb_ms")
        calls = [RawCall(("HMGET", self.keys.runner(r), *fields)) for r in runner_ids]
        # Redis time in the same round trip (a record a little newer than it is recent)
        res = await self.batch([*calls, RawCall(("TIME",))])
        secs, micros = res.pop()
        now = int(secs) * MS_PER_S + int(micros) // MS_PER_S
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
        raw: Any = await self.call(
            RawCall(("XRANGE", self.keys.outbox(runner_id), "-", "+", "COUNT", 200))
        )
        return parse_outbox(runner_id, raw or [])

    async def ack_outbox(
        self,
        runner_id: str,
        stream_ids: Sequence[str],
        *,
        shards: int,
        lease_s: float,
        also: Sequence[Call] = (),
    ) -> tuple[set[str], list[Any]]:
        """Delete published entries and drop the outbox's due mark, in one round trip.

        The batch is `ack_outbox` (deletes the entries; an emptied outbox is removed),
        `ZREM` of the runner's due mark, then `also` (calls of the caller's own to run in
        the same round trip). The mark cannot be dropped in the script (it lives in an
        index shard's slot, docs/design.md), so it is dropped unconditionally and written again
        when entries are left (another writer's, still in flight: due in `lease_s`
        seconds, the writer's own lease), a rare second round trip.
        On a single Redis the two commands of one pipeline run back to back; on a cluster
        a writer whose mark lands between them still publishes its own entries right
        away, and the SCAN at start is the backstop if it also dies in that window.

        Returns:
            The ids this call deleted (an entry another delivery deleted first is not among
            them: exactly one delivery owns each entry's history record), and the results
            of `also` in order.

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: Redis refused a call.
        """
        due = self.keys.outbox_due(self.keys.shard_of(runner_id, shards))
        calls: list[Call] = [
            ScriptCall("ack_outbox", (self.keys.outbox(runner_id),), tuple(stream_ids)),
            RawCall(("ZREM", due, runner_id)),
            *also,
        ]
        res = await self.batch(calls)
        left, deleted = int(res[0][0]), {str(i) for i in res[0][1]}
        if left:
            await self.call(self.outbox_due_call(runner_id, delay_s=lease_s, shards=shards))
        return deleted, res[2:]

    def outbox_due_call(self, runner_id: str, *, delay_s: float, shards: int) -> ScriptCall:
        """The `mark_due` call of a runner's outbox (see `mark_outbox_due`)."""
        key = self.keys.outbox_due(self.keys.shard_of(runner_id, shards))
        return ScriptCall("mark_due", (key,), (runner_id, int(delay_s * MS_PER_S), "", 0))

    def open_marks_calls(
        self,
        runner_id: str,
        session_id: str,
        *,
        lease_s: float,
        idle_ttl_s: int,
        shards: int,
        now_ms: int | None = None,
    ) -> list[Call]:
        """A pair's outbox due mark and its session's idle deadline, written before the open.

        Both sets are in the runner's index shard (one slot). They run before the open in
        its batch (a crash after the open leaves nothing undelivered and nothing that
        never expires). The due time is now + the lease (an earlier one is kept: `ZADD
        LT`), the deadline now + idle TTL + the lease (see mark_open.lua); a refused open
        removes the deadline (`unschedule_expiry_call`), and the sweep drops one whose
        session does not exist.

        Args:
            runner_id: the runner.
            session_id: the session about to open.
            lease_s: the outbox lease of the instance that publishes right away.
            idle_ttl_s: the session idle TTL.
            shards: index shards.
            now_ms: a Redis time read earlier in the same request: then two plain `ZADD`s
                (no script, no TIME); None: the `mark_open` script, which reads it.
        """
        shard = self.keys.shard_of(runner_id, shards)
        due_key, expiry_key = self.keys.outbox_due(shard), self.keys.expiry(shard)
        lease_ms, idle_ms = int(lease_s * MS_PER_S), idle_ttl_s * MS_PER_S
        member = f"{runner_id}\n{session_id}"
        if now_ms is not None:
            return [
                RawCall(("ZADD", due_key, "LT", now_ms + lease_ms, runner_id)),
                RawCall(("ZADD", expiry_key, now_ms + idle_ms + lease_ms, member)),
            ]
        return [
            ScriptCall("mark_open", (due_key, expiry_key), (runner_id, lease_ms, member, idle_ms))
        ]

    async def mark_outbox_due(self, runner_id: str, *, delay_s: float, shards: int) -> None:
        """Note that a runner's outbox must be drained `delay_s` seconds from now at the latest.

        The delay is a lease for the instance that publishes it right away; others pass 0.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.call(self.outbox_due_call(runner_id, delay_s=delay_s, shards=shards))

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

    async def runner_pages(self, size: int) -> AsyncIterator[list[str]]:
        """Ids of the runners the store keeps a hash for (SCAN), up to `size` at a time.

        What the presence reconciliation walks (`mqtt_pairing.presence`): a runner has a
        hash once it asked for a code or its status was recorded. SCAN's order; an id may
        come twice while keys are added.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        head = self.keys.runner("\x00").split("\x00")[0]
        pattern = f"{glob_escape(head)}*}}"  # not the runner's `...}:sessions` hash
        scan = self.client.scan_iter(match=pattern, count=1000).__aiter__()

        async def take() -> list[str]:
            keys: list[str] = []
            async for key in scan:
                keys.append(str(key)[len(head) : -1])
                if len(keys) >= size:
                    break
            return keys

        while page := await self._guard(take()):
            yield page

    async def hold_presence_lease(
        self, holder: str, *, lease_s: float, release: bool = False
    ) -> bool:
        """Take or keep the presence-recording lease; True while `holder` has it.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "hold_lease",
            [self.keys.presence_leader()],
            [holder, int(lease_s * MS_PER_S), int(release)],
        )
        return int(res) == 1
