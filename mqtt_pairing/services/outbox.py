"""The outbox relay: publishes the events that state-changing scripts wrote.

docs/design.md "Delivery": a crash between a change and its publish loses nothing.

Every event starts as an entry in the runner's outbox stream, written by the same Lua
script that changed the state. The script returns the entries it wrote (with their stream
ids), and the instance that ran it publishes exactly those right away and deletes them
(requests of one runner that run at once share its outbox, and each publishes only its
own, so that each event goes out once when nothing fails): `ack_outbox`, in one round
trip with dropping the mark and the request's own closing calls. Meanwhile a due mark with
a lease (`outbox-due:{global:<n>}`) says "drain this outbox by then". If the instance dies
first, the mark comes due and any instance's sweep claims it, publishes and deletes the entries.
At start, a SCAN finds outboxes whose mark was never written (a crash between the script
and the mark). An event can thus be published twice, never lost; its `event_id` is
deterministic, so clients drop the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence

from mqtt_pairing.config import Settings
from mqtt_pairing.errors import PairingError
from mqtt_pairing.models import PairingHistoryEntry, format_ts
from mqtt_pairing.services import events
from mqtt_pairing.services.events import Event, event_id
from mqtt_pairing.services.history import PairingHistoryService
from mqtt_pairing.store.redis_store import Call, OutboxEntry, PairingStore
from mqtt_pairing.topics import Kind

log = logging.getLogger(__name__)

Publish = Callable[[list[Event]], Awaitable[None]]

_CLAIM_BATCH = 100
HISTORY_TRIM_INTERVAL_S = 60.0
"""How often the sweep trims the global history shards by age (docs/design.md "History")."""


def render(entry: OutboxEntry) -> list[Event]:
    """The wire events of one outbox entry (docs/protocol.md payloads)."""
    s = entry.session
    if entry.type == "session.opened" and s is not None:
        opened = events.session_opened(
            s,
            app_public_key=entry.extra.get("app_public_key"),
            app_metadata=entry.extra.get("app_metadata"),
        )
        if "uses_left" not in entry.extra:  # written before code.used rode along
            return opened
        uses_left = int(entry.extra["uses_left"])
        return [*opened, events.code_used(s.runner_id, s.session_id, uses_left, s.created_at_ms)]
    if entry.type == "session.closed" and s is not None:
        return events.session_closed(s)
    if entry.type == "code.used" and s is not None:
        uses_left = int(entry.extra["uses_left"])
        return [events.code_used(s.runner_id, s.session_id, uses_left, s.created_at_ms)]
    if entry.type in ("runner.online", "runner.offline"):
        pv = str(entry.extra.get("pv"))
        out: list[Event] = []
        for session_id, app_id in entry.extra.get("sessions", []):
            payload = {
                "event": entry.type,
                "event_id": event_id(entry.runner_id, "presence", pv, session_id),
                "at": format_ts(entry.at_ms),
                "runner_id": entry.runner_id,
                "session_id": session_id,
            }
            out.append(Event(Kind.APP, str(app_id), payload))
        return out
    log.warning("unknown outbox entry type %r dropped", entry.type)
    return []


class OutboxRelay:
    """Publishes outbox entries and sweeps due outboxes and session expiries.

    Args:
        store: the Redis store.
        settings: lease, sweep interval, shards, idle TTL.
        publish: sends events to the broker (raises on a lost connection).
    """

    def __init__(
        self,
        store: PairingStore,
        settings: Settings,
        publish: Publish,
        history: PairingHistoryService | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.publish = publish
        self.history = history
        self._trimmed_at: float | None = None

    async def _acknowledge(
        self,
        runner_id: str,
        entries: Sequence[OutboxEntry],
        also: Sequence[Call] = (),
        recorded: Collection[str] = (),
        *,
        orphans: bool = False,
    ) -> None:
        """Delete published entries and drop the due mark, with `also`, in one round trip.

        `orphans`: the entries are a drain's (the sweep's, after their writer's lease ran
        out): the `pair.succeeded` of a `session.opened` among them is recorded here, as
        its pair did not finish (a request's close that hands over a slow pair's entry
        leaves that record to the pair).

        The history records of the deleted `session.opened` / `session.closed` entries
        follow in a second round trip (only the entries this call deleted are recorded,
        and which those are is known only from its result), except for the types in
        `recorded`, whose records `also` writes already (a pair's `session.opened`).

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: Redis refused a call.
        """
        deleted, _ = await self.store.ack_outbox(
            runner_id,
            [e.stream_id for e in entries],
            shards=self._shards,
            lease_s=self.settings.pairing_outbox_lease_s,
            also=also,
        )
        mine = [e for e in entries if e.stream_id in deleted and e.type not in recorded]
        if self.history is None:
            return
        calls = [
            *self.history.calls(self._records(mine, "session.closed")),
            # open_session wrote the runner's record of a pair
            *self.history.calls(
                self._records(mine if orphans else [], "session.opened"),
                streams=("global", "app"),
            ),
        ]
        if calls:
            try:
                await self.store.batch(calls)
            except PairingError as exc:
                log.warning("history of delivered events not written: %s", exc.message)

    @staticmethod
    def _records(entries: Sequence[OutboxEntry], kind: str) -> list[PairingHistoryEntry]:
        """The history records of deleted entries of one type.

        The delivery that deleted an entry writes them (exactly one does: `ack_outbox`):
        `session.closed`, and the `pair.succeeded` of a `session.opened` entry whose pair
        did not finish (a crash: `orphans`; the pair's own finish writes it otherwise).
        """
        records = []
        for entry in entries:
            s = entry.session
            if s is None or entry.type != kind:
                continue
            if kind == "session.opened":
                records.append(
                    PairingHistoryEntry(
                        event="pair.succeeded",
                        at_ms=entry.at_ms,
                        runner_id=s.runner_id,
                        app_id=s.app_id,
                        session_id=s.session_id,
                        code_mask=entry.extra.get("code_mask") or None,
                    )
                )
                continue
            reason = s.closed_reason.value if s.closed_reason else None
            records.append(
                PairingHistoryEntry(
                    event=entry.type,
                    at_ms=entry.at_ms,
                    runner_id=s.runner_id,
                    app_id=s.app_id,
                    session_id=s.session_id,
                    detail=f"closed_reason={reason}" if reason else None,
                )
            )
        return records

    @property
    def _shards(self) -> int:
        return self.settings.pairing_index_shards

    async def deliver(
        self,
        entries: Sequence[OutboxEntry],
        *,
        marked: bool = False,
        after: Sequence[Call] = (),
        recorded: Collection[str] = (),
    ) -> None:
        """Publish entries right after the script that wrote them, then delete them.

        Unless `marked` (the caller wrote it in a batch already), the outbox's due mark is
        written with a lease while the events are published. `after` are the request's
        own closing calls (a pair's: remember the reply, settle the claim, history, ...):
        they ride in the round trip that deletes the entries, and run on their own when
        publishing fails, so the request is finished either way. `recorded`: entry types
        whose history records `after` writes (not written again by the delivery).

        Raises:
            StoreUnavailable: Redis is unreachable (the entries stay for the sweep).
            aiomqtt.MqttError: publishing failed (likewise).
        """
        by_runner: dict[str, list[OutboxEntry]] = {}
        for entry in entries:
            by_runner.setdefault(entry.runner_id, []).append(entry)
        pending = list(after)
        for runner_id, items in by_runner.items():
            rendered = [e for item in items for e in render(item)]
            try:
                if marked:
                    await self.publish(rendered)
                else:
                    mark = self.store.mark_outbox_due(
                        runner_id, delay_s=self.settings.pairing_outbox_lease_s, shards=self._shards
                    )
                    await asyncio.gather(mark, self.publish(rendered))
            except Exception:
                if pending:
                    try:
                        await self.store.batch(pending)
                    except PairingError as exc:
                        # Left pending: a retry of the request finishes it (idempotent).
                        log.warning("request not finished: %s", exc.message)
                raise
            await self._acknowledge(runner_id, items, also=pending, recorded=recorded)
            pending = []
        if pending:
            await self.store.batch(pending)

    async def drain(self, runner_id: str) -> int:
        """Publish and delete everything in one runner's outbox; returns how many entries.

        Raises:
            StoreUnavailable: Redis is unreachable.
            aiomqtt.MqttError: publishing failed.
        """
        entries = await self.store.read_outbox(runner_id)
        if entries:
            await self.publish([e for entry in entries for e in render(entry)])
        await self._acknowledge(runner_id, entries, orphans=True)
        return len(entries)

    async def recover(self) -> int:
        """At start: drain every non-empty outbox (found by SCAN); returns how many.

        Raises:
            StoreUnavailable: Redis is unreachable.
            aiomqtt.MqttError: publishing failed.
        """
        runners = await self.store.scan_outboxes()
        for runner_id in runners:
            await self.drain(runner_id)
        if runners:
            log.info("recovered the outboxes of %d runner(s)", len(runners))
        return len(runners)

    async def sweep_once(self) -> None:
        """Drain due outboxes and expire idle sessions, in every shard.

        Raises:
            StoreUnavailable: Redis is unreachable.
            aiomqtt.MqttError: publishing failed.
        """
        s = self.settings
        lease = s.pairing_outbox_lease_s
        await self._trim_history()
        for shard in range(self._shards):
            for runner_id in await self.store.claim_due_outboxes(
                shard, limit=_CLAIM_BATCH, lease_s=lease
            ):
                await self.drain(runner_id)
            for runner_id, session_id in await self.store.claim_due_expiries(
                shard, limit=_CLAIM_BATCH, lease_s=lease
            ):
                closed, outbox = await self.store.expire_session(
                    runner_id,
                    session_id,
                    idle_ttl_s=s.pairing_session_idle_ttl_s,
                    shards=self._shards,
                )
                if closed is not None:
                    log.info("session expired runner=%s session=%s", runner_id, session_id)
                    await self.deliver(outbox)

    async def _trim_history(self) -> None:
        """Trim the global history shards by age, at most every `HISTORY_TRIM_INTERVAL_S`.

        Off the request path (a pair's `XADD` trims by count only): a record older than
        `PAIRING_HISTORY_RETENTION_S` stays at most about a minute longer while any
        instance runs, and the admin commands never show it (admin.py).
        """
        clock = asyncio.get_running_loop().time()
        if self._trimmed_at is not None and clock - self._trimmed_at < HISTORY_TRIM_INTERVAL_S:
            return
        self._trimmed_at = clock
        retention_s = self.settings.pairing_history_retention_s
        await self.store.batch(
            [
                self.store.trim_history_call(shard, retention_s=retention_s)
                for shard in range(self._shards)
            ]
        )

    async def run(self, connected: asyncio.Event, stopping: asyncio.Event) -> None:
        """Sweep every `PAIRING_SWEEP_INTERVAL_S` while connected, until `stopping`."""
        recovered = False
        while not stopping.is_set():
            try:
                await connected.wait()
                if not recovered:
                    await self.recover()
                    recovered = True
                await self.sweep_once()
            except PairingError as exc:
                log.warning("outbox sweep: %s", exc.message)
            except Exception as exc:  # a lost broker connection, mostly
                log.warning("outbox sweep failed: %s", type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.pairing_sweep_interval_s)
