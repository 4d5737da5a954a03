"""Runner presence on a connection of its own, reconciled with the broker's retained statuses.

Status messages (`P/runners/{id}/status`, retained, docs/protocol.md "Presence") arrive on
the presence connection, client id `<MQTT_CLIENT_ID>:presence`, not on the one that
carries requests. A broker caps each session's queue (Mosquitto: `max_queued_messages`,
one limit for all of a session's subscriptions), so a presence storm on a shared session
would fill the queue that requests need and have the broker drop them. Here it can only
fill its own.

The presence connection starts clean every time and acknowledges a status message as
soon as it is read, so the broker's queue for it stays short; statuses wait to be
recorded in this process. Live statuses past `PAIRING_PRESENCE_BACKLOG` waiting are
dropped and counted (`status_shed`), their runners remembered, and re-read from the
broker once the backlog has drained. One runner's statuses are recorded in order (one
worker per runner).

Nothing is lost for good, because a runner's retained status is its presence. A
*reconciliation* makes the recorded presence match the retained statuses:

- on connect (after a restart of the service or the broker, or a new presence lease):
  the fresh subscription to `P/runners/+/status` replays every retained status the
  broker can queue (Mosquitto: the in-flight window plus `max_queued_messages`; past
  that it drops the rest and logs "Outgoing messages are being dropped"); then the
  runners the store knows (`PairingStore.runner_pages`) that the replay missed are
  checked by exact topic;
- after losses, statuses the broker dropped (it drops what its queue for the session
  cannot hold: on Mosquitto a dropped message leaves a gap in the packet ids the
  session receives) or Redis failed to record: the same, subscribing to the filter
  again, once the backlog has drained, at most every FULL_GAP_S;
- after statuses were dropped here: the runners whose status was dropped (as after
  losses, if more than SHED_MEMORY were);
- every `PAIRING_PRESENCE_RECONCILE_S` (0: never): every runner the store knows.

Checking by exact topic means subscribing to up to PAGE runners' status topics at once
and unsubscribing again: the broker replays their retained statuses, a page at a time,
each page sent once the previous one's replay is in and the backlog is short, so that
live statuses never wait behind a long replay (a page the broker's queue does not hold
shows as a gap, and its runners are checked again in smaller pages). Replays are
never dropped (they come only when asked for); a replay that matches what is recorded
changes nothing, one that does not is recorded and announced, late but not lost.
Everything arrives on one connection in the broker's order, so a replay never
overtakes a newer live status of the same runner.

While the presence connection is down, or its reconciliation on connect runs, the record
of a runner not read again yet is *stale*: a broker restart in particular leaves runners
recorded offline that came back with it (Mosquitto publishes every client's Last Will
when it shuts down, and the presence connection records them before it closes). A
`pair` refused `RUNNER_OFFLINE` on a stale record waits (`refreshed`, at most REFRESH_S)
until the runner's status has been read again on the new connection, and is tried once
more.

With a shared group one instance at a time records presence: the holder of a lease in
Redis (`PAIRING_PRESENCE_LEASE_S`). Status messages carry no sequence number, so two
instances recording the same stream could apply them out of order. Only the holder
keeps a presence connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import aiomqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_pairing.config import Settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.errors import PairingError
from mqtt_pairing.mqtt_link import Endpoint, MqttLink, make_client
from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.topics import TopicScheme, is_valid_id

if TYPE_CHECKING:
    from mqtt_pairing.mqtt_address import BrokerAddress

log = logging.getLogger(__name__)

PAGE = 500
"""Runners per exact-topic SUBSCRIBE of a reconciliation: well below any broker's queue."""
WORKERS = 16
"""Status messages recorded at once (one runner's always by the same worker, in order).

Their store calls share round trips with each other and with the requests'
(store/pipelining.py), so a storm of retained statuses after a broker restart is taken
in about WORKERS statuses per Redis round trip."""
SETTLE_S = 0.5
"""A replay is taken as complete once no replayed status came for this long."""
RETRY_S = 5.0
"""A reconciliation stopped by Redis being away starts again after this."""
RECEIVE_MAXIMUM = 65_535
"""The presence connection's MQTT 5 Receive Maximum: the most the broker may send at once
(Mosquitto queues `max_queued_messages` beyond it), hence the most of a replay it keeps."""
HIGH_WATER = 0.8
"""A warning when the backlog passes this fraction of `PAIRING_PRESENCE_BACKLOG`."""
SHED_MEMORY = 100_000
"""Runners whose dropped status is remembered for the repair (at least); past that, the
repair checks every runner the store knows."""

FULL_GAP_S = 30.0
"""The least time between two reconciliations after the broker dropped statuses (or Redis
failed to record some): a storm that goes on brings them back, not more often."""
MID_MAX = 65_535
REFRESH_S = 5.0
"""The longest a `pair` refused on a stale record waits for the runner's status (`refreshed`)."""

Mode = Literal["on connect", "after losses", "after dropped statuses", "periodic"]
"""Why a reconciliation runs (its log line says it). "after losses": the broker dropped
statuses, or Redis did not record some; "after dropped statuses": this process shed some."""

Finish = Callable[[Handled], Awaitable[None]]
"""Publishes a recorded status's events (the gateway's, on the requests connection)."""


@dataclass(slots=True)
class _Status:
    runner_id: str
    payload: bytes
    retained: bool
    connection: int
    """The presence connection it was read on (`PresenceRecorder._connection`)."""


class PresenceRecorder:
    """Records runners' status messages; keeps the presence connection and reconciles.

    Args:
        settings: all settings.
        dispatcher: records a status (`Dispatcher.handle_status`); its store holds the lease.
        address: the broker.
        protocol: "5" or "3.1.1".
        finish: publishes the events of a recorded status.
        drops: where a status topic with a malformed runner id is counted
            (`dropped.bad_id`: the gateway's counters, with the requests dropped for their
            topic).
        shared: several instances share the work (a shared group): hold the lease first.
        instance_id: this instance, as the lease names it.

    Attributes:
        counters: `status_shed`, `presence.reconciled`, the presence connection's
            losses and takeovers, ... (exported as metrics with the gateway's).
        records: whether this instance records presence now.
        backlog: statuses read and not yet recorded.
        link: the presence connection.
        last_reconcile_s: how long the last complete reconciliation took (None before).
    """

    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        address: BrokerAddress,
        *,
        protocol: Literal["5", "3.1.1"],
        finish: Finish,
        drops: Counter[str],
        shared: bool,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.dispatcher = dispatcher
        self.protocol = protocol
        self.finish = finish
        self.drops = drops
        self.counters: Counter[str] = Counter()
        self.shared = shared
        self.instance_id = instance_id
        self.scheme = TopicScheme(settings.pairing_topic_prefix)
        self.records = not shared
        self.limit = settings.pairing_presence_backlog
        self.backlog = 0
        self.last_reconcile_s: float | None = None
        self.link = self._make_link(address)
        self._queues: list[asyncio.Queue[_Status | asyncio.Future[None]]] = [
            asyncio.Queue() for _ in range(WORKERS)
        ]
        self._records_changed = asyncio.Event()
        self._tenure_over = asyncio.Event()
        self._backlog_changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._replayed: set[str] | None = None
        self._held: set[str] = set()
        """Runners with a held-back presence announcement scheduled."""
        self._announcing: set[asyncio.Task[None]] = set()
        self._replay_arrived = asyncio.Event()
        self._replays = 0
        """Replayed (retained) statuses read so far."""
        self._awaited = 0
        """Replays the pages asked for that have not come yet (a pacing estimate)."""
        self._shed_in_episode = 0
        self._shed_ids: set[str] = set()
        self._shed_overflowed = False
        self._high = False
        self._check_all = False
        """Some statuses may be lost (the broker dropped some, Redis away): check every
        runner soon."""
        self._failures_seen = 0
        self._full_at = 0.0
        self._last_mid = 0
        """The packet id of the last QoS 1 status read (0: none yet on this connection)."""
        self._gaps = 0
        """Statuses the broker dropped (gaps in packet ids), all told."""
        self._paging = False
        self._page_size = max(1, min(PAGE, self.limit // 4))
        self._connection = 0
        """Presence connections lost so far: the number of the current (or next) one."""
        self._current = False
        """The recorded presence is current: connected, and reconciled on connect."""
        self._fresh: set[str] = set()
        """Runners whose status was recorded from the current connection, while not current."""
        self._refresh_waiters: dict[str, list[asyncio.Future[None]]] = {}

    def _make_link(self, address: BrokerAddress) -> MqttLink:
        """The presence connection: its own client id and a clean session."""
        client_id = f"{self.settings.mqtt_client_id}:presence"
        client = make_client(
            address,
            self.settings,
            client_id=client_id,
            protocol=self.protocol,
            persistent=False,
            receive_maximum=RECEIVE_MAXIMUM,
        )
        return MqttLink(
            client,
            Endpoint(address, self.protocol, client_id, "presence"),
            reconnect_max_s=self.settings.mqtt_reconnect_max_s,
            counters=self.counters,
        )

    # ---- running ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Record presence until `stopping` is set (while holding the lease, if shared)."""
        background = [asyncio.create_task(self._worker(q)) for q in self._queues]
        if self.shared:
            background.append(asyncio.create_task(self._hold_lease(stopping)))
        try:
            while not stopping.is_set():
                if not self.records:
                    self._records_changed.clear()
                    await _first(stopping.wait(), self._records_changed.wait())
                    continue
                self._tenure_over = asyncio.Event()
                watcher = asyncio.create_task(self._end_tenure(stopping))
                try:
                    await self.link.run(_nothing, self._serve, self._tenure_over)
                finally:
                    watcher.cancel()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)

    async def _end_tenure(self, stopping: asyncio.Event) -> None:
        while self.records and not stopping.is_set():
            self._records_changed.clear()
            await _first(stopping.wait(), self._records_changed.wait())
        self._tenure_over.set()

    async def _hold_lease(self, stopping: asyncio.Event) -> None:
        """Hold (or wait for) the presence lease; `records` follows it."""
        lease_s = self.settings.pairing_presence_lease_s
        store = self.dispatcher.store
        try:
            while not stopping.is_set():
                try:
                    held = await store.hold_presence_lease(self.instance_id, lease_s=lease_s)
                except PairingError:
                    held = False  # Redis away: the lease lapses for everyone alike
                if held != self.records:
                    self.records = held
                    self._records_changed.set()
                    log.info("%s recording runners' status", "now" if held else "no longer")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), lease_s / 3)
        finally:
            with contextlib.suppress(Exception):
                await store.hold_presence_lease(self.instance_id, lease_s=lease_s, release=True)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Read and reconcile until the tenure ends; raises MqttError on a lost connection."""
        self._last_mid = 0  # a new session numbers from 1
        reader = asyncio.ensure_future(self._read(client))
        keeper = asyncio.ensure_future(self._keep_reconciled(client))
        over = asyncio.ensure_future(self._tenure_over.wait())
        tasks = (reader, keeper, over)
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # What was read on this connection and is still queued (the Last Wills a
            # broker publishes as it shuts down) does not make a record fresh.
            self._current = False
            self._connection += 1
            self._fresh.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in (reader, keeper):
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error  # a lost connection

    # ---- reading and recording -------------------------------------------------------------

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            runner_id = self.scheme.parse_status(message.topic.value)
            if runner_id is None:
                self.drops["dropped.bad_id"] += 1
                continue
            payload = message.payload
            if isinstance(payload, str):
                payload = payload.encode()
            elif not isinstance(payload, bytes | bytearray):
                payload = b"" if payload is None else str(payload).encode()
            if message.qos > 0:
                self._check_packet_id(message.mid)
            self._enqueue(
                _Status(runner_id, bytes(payload), bool(message.retain), self._connection)
            )

    def _check_packet_id(self, mid: int) -> None:
        """Count the statuses the broker dropped for this session: gaps in packet ids.

        Mosquitto numbers the QoS 1 messages it sends a client 1, 2, ... 65535, 1, ...
        in the order it sends them, and takes the number before it finds the session's
        queue full and drops the message (`subs__send`, `retain__process`), so every
        dropped status leaves a gap. Other brokers may number on delivery; there the
        periodic check (`PAIRING_PRESENCE_RECONCILE_S`) is what repairs.
        """
        last, self._last_mid = self._last_mid, mid
        if last == 0:
            return
        gap = (mid - (last % MID_MAX + 1)) % MID_MAX
        if 0 < gap < MID_MAX // 2:  # a large "gap" is a message sent again, not a loss
            self.counters["status_dropped_by_broker"] += gap
            self._gaps += gap
            if self._paging:
                return  # a page the queue did not hold: the reconciliation redoes it
            if not self._check_all:
                log.warning(
                    "the broker dropped status messages for %s (its queue for the session "
                    "was full: max_queued_messages); every runner is checked once the "
                    "backlog has drained",
                    self.link.endpoint.client_id,
                )
            self._check_all = True

    def _enqueue(self, status: _Status) -> None:
        # Replays are never shed: they come only when asked for, as many as the broker
        # queues for a new subscription or a page holds.
        if self.backlog >= self.limit and not status.retained:
            self.counters["status_shed"] += 1
            if self._shed_in_episode == 0:
                log.warning(
                    "presence backlog full (%d status messages, PAIRING_PRESENCE_BACKLOG): "
                    "dropping status messages; presence is reconciled once it drains",
                    self.backlog,
                )
            self._shed_in_episode += 1
            if len(self._shed_ids) < max(self.limit, SHED_MEMORY):
                self._shed_ids.add(status.runner_id)
            else:
                self._shed_overflowed = True
            return
        self.backlog += 1
        if not self._high and self.backlog >= self.limit * HIGH_WATER:
            self._high = True
            log.warning(
                "presence backlog at %d of %d status messages (PAIRING_PRESENCE_BACKLOG)",
                self.backlog,
                self.limit,
            )
        if status.retained:
            self._replay_arrived.set()
            self._awaited = max(0, self._awaited - 1)
            self._replays += 1
            if self._replayed is not None:
                self._replayed.add(status.runner_id)
        index = zlib.crc32(status.runner_id.encode()) % WORKERS
        self._queues[index].put_nowait(status)

    def _announce_later(self, runner_id: str, delay_s: float) -> None:
        """A presence change of `runner_id` was held back: announce it once allowed.

        In memory; if this instance stops first, the next reconciliation (a replayed
        retained status) announces it (docs/protocol.md "Events").
        """
        if runner_id in self._held:
            return
        self._held.add(runner_id)
        loop = asyncio.get_running_loop()
        loop.call_later(delay_s + 0.05, self._spawn_announce, runner_id)

    def _spawn_announce(self, runner_id: str) -> None:
        self._held.discard(runner_id)
        task = asyncio.create_task(self._announce(runner_id))
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _announce(self, runner_id: str) -> None:
        try:
            handled = await self.dispatcher.announce_held(
                runner_id, held=functools.partial(self._announce_later, runner_id)
            )
            await self.finish(handled)
        except aiomqtt.MqttError as exc:
            self.counters["publish_failed"] += 1  # the events stay in the outbox
            log.warning("could not publish presence events: %s", exc)
        except Exception:
            self.counters["internal_error"] += 1
            log.exception("unexpected error announcing a held-back presence change")

    async def _worker(self, queue: asyncio.Queue[_Status | asyncio.Future[None]]) -> None:
        while True:
            item = await queue.get()
            if isinstance(item, asyncio.Future):  # a mark: everything before it is done
                if not item.done():
                    item.set_result(None)
                continue
            try:
                handled = await self.dispatcher.handle_status(
                    item.runner_id,
                    item.payload,
                    retained=item.retained,
                    held=functools.partial(self._announce_later, item.runner_id),
                )
                self._note_failures()
                self._note_fresh(item)
                await self.finish(handled)
            except aiomqtt.MqttError as exc:
                self.counters["publish_failed"] += 1  # the events stay in the outbox
                log.warning("could not publish presence events: %s", exc)
            except Exception:
                self.counters["internal_error"] += 1
                log.exception("unexpected error recording a status message")
            finally:
                self._recorded()

    def _note_fresh(self, status: _Status) -> None:
        """A status read on the current connection is recorded: the runner's record is fresh."""
        if self._current or status.connection != self._connection:
            return
        self._fresh.add(status.runner_id)
        for waiter in self._refresh_waiters.pop(status.runner_id, ()):
            if not waiter.done():
                waiter.set_result(None)

    def _now_current(self) -> None:
        """The reconciliation on connect is done: every record is as fresh as it gets."""
        self._current = True
        self._fresh.clear()
        waiters, self._refresh_waiters = self._refresh_waiters, {}
        for waiter in (w for ws in waiters.values() for w in ws):
            if not waiter.done():
                waiter.set_result(None)

    async def refreshed(self, runner_id: str, *, timeout_s: float = REFRESH_S) -> bool:
        """After a `pair` was refused RUNNER_OFFLINE: wait until the runner's record is fresh.

        The record is stale while the presence connection is down or reconciles on
        connect, until the runner's status has been read and recorded on the new
        connection (docs/operations.md "Restarts: presence converges").

        Args:
            runner_id: the runner the refusal named.
            timeout_s: the longest wait, seconds.

        Returns:
            True when the record was stale and has been refreshed since (or the
            reconciliation finished) within `timeout_s`: try the pair again. False when
            the record was fresh (the refusal stands), this instance does not record
            presence (another holds the lease), or the wait timed out.
        """
        if not self.records or self._current or runner_id in self._fresh:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._refresh_waiters.setdefault(runner_id, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            self.counters["presence.refresh_timed_out"] += 1
            return False
        finally:
            waiters = self._refresh_waiters.get(runner_id)
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._refresh_waiters[runner_id]
        return True

    def _note_failures(self) -> None:
        """After a status Redis did not take (unreachable, refused), check every runner.

        `Dispatcher.handle_status` counts such failures; the check runs once the backlog
        has drained, and again later if Redis is still away.
        """
        counters = self.dispatcher.counters
        failures = counters["status.SERVICE_UNAVAILABLE"] + counters["status.INTERNAL_ERROR"]
        if failures > self._failures_seen:
            self._failures_seen = failures
            if not self._check_all:
                log.warning("status messages not recorded (Redis): every runner is checked later")
            self._check_all = True

    def _recorded(self) -> None:
        self.backlog -= 1
        self._backlog_changed.set()
        if self._high and self.backlog < self.limit * HIGH_WATER / 2:
            self._high = False
        if self.backlog > self.limit // 10:
            return
        if self._shed_in_episode:
            log.warning(
                "presence backlog drained; %d status messages were dropped: reconciling "
                "those runners",
                self._shed_in_episode,
            )
            self._shed_in_episode = 0
            self._wake.set()
        if self._check_all:
            self._wake.set()

    async def _recorded_so_far(self) -> None:
        """Wait until every status queued before now is recorded."""
        marks: list[asyncio.Future[None]] = []
        for queue in self._queues:
            mark: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.put_nowait(mark)
            marks.append(mark)
        await asyncio.gather(*marks)

    # ---- reconciliation -----------------------------------------------------------------

    async def _keep_reconciled(self, client: aiomqtt.Client) -> None:
        """Reconcile now (a fresh connection), then after losses or shedding, and every period."""
        period = self.settings.pairing_presence_reconcile_s or None
        loop = asyncio.get_running_loop()
        mode: Mode = "on connect"
        while True:
            self._wake.clear()
            shed, overflowed = self._shed_ids, self._shed_overflowed
            self._shed_ids, self._shed_overflowed = set(), False
            if mode != "on connect" and (self._check_all or overflowed):
                mode = "after losses"
                await asyncio.sleep(max(0.0, self._full_at + FULL_GAP_S - loop.time()))
            self._check_all = False
            try:
                if mode == "after dropped statuses":
                    await self._reconcile(client, mode, only=shed)
                else:
                    await self._reconcile(client, mode)
            except aiomqtt.MqttError:
                raise  # the connection is lost: a new one reconciles on connect
            except Exception as exc:
                self._shed_ids |= shed
                self._shed_overflowed |= overflowed
                self._check_all |= mode in ("after losses", "periodic")
                if isinstance(exc, PairingError):
                    log.warning(
                        "presence reconciliation stopped (%s); again in %.0f s",
                        exc.message,
                        RETRY_S,
                    )
                else:
                    self.counters["internal_error"] += 1
                    log.exception("presence reconciliation failed; again in %.0f s", RETRY_S)
                await asyncio.sleep(RETRY_S)
                continue
            if mode in ("on connect", "after losses"):
                self._full_at = loop.time()
            if mode == "on connect":
                self._now_current()
            try:
                await asyncio.wait_for(self._wake.wait(), period)
                mode = "after dropped statuses"  # or after losses: see above
            except TimeoutError:
                mode = "periodic"

    async def _reconcile(
        self,
        client: aiomqtt.Client,
        mode: Mode,
        *,
        only: set[str] | None = None,
    ) -> None:
        """Make the recorded presence match the retained statuses.

        On connect and after losses, subscribing to every status again replays the
        retained statuses (as many as the broker queues; runners the store does not know
        yet included), then the runners the store knows and the replay missed are
        checked by exact topic. Periodically, every runner the store knows is checked by
        exact topic; after shedding, only the runners whose status was dropped.

        Raises:
            aiomqtt.MqttError: the connection was lost.
            PairingError: Redis is away (the walk stops; run again later).
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        replays_before = self._replays
        replayed: set[str] = set()
        asked: set[str] = set()
        self._replayed = replayed
        try:
            if mode in ("on connect", "after losses"):
                await self._subscribe_wildcard(client)
                await self._settle()
                # What the queue could not hold of the replay left a gap in the packet
                # ids: asked for, not a loss of live statuses. Count from here.
                self._last_mid = 0
            self._paging = True
            gaps = self._gaps
            if only is not None:
                pages = _chunks(sorted(only), self._page_size)
            else:
                pages = self.dispatcher.store.runner_pages(self._page_size)
            await self._check_pages(client, pages, replayed, asked)
            # A page the broker's queue could not hold (gaps): its runners that did not
            # come again, in smaller pages, until a page fits.
            while self._gaps > gaps and self._page_size > 1:
                self._page_size = max(1, self._page_size // 4)
                missing = sorted(asked - replayed)
                log.info(
                    "the broker's queue did not hold a page of replayed statuses; checking "
                    "%d runners again, %d at a time",
                    len(missing),
                    self._page_size,
                )
                gaps = self._gaps
                await self._check_pages(client, _chunks(missing, self._page_size), replayed)
            if self._gaps > gaps:
                self._check_all = True
        finally:
            self._replayed = None
            self._paging = False
        await self._recorded_so_far()
        took = loop.time() - started
        self.last_reconcile_s = took
        self.counters["presence.reconciled"] += 1
        log.info(
            "presence reconciled %s in %.1f s: %d runners checked by exact topic, "
            "%d retained statuses replayed",
            mode,
            took,
            len(asked),
            self._replays - replays_before,
        )

    async def _check_pages(
        self,
        client: aiomqtt.Client,
        pages: AsyncIterator[list[str]],
        replayed: set[str],
        asked: set[str] | None = None,
    ) -> None:
        """Subscribe to the exact status topics of each page, paced; then settle."""
        checked = 0
        async for page in pages:
            ids = [r for r in page if r not in replayed and is_valid_id(r)]
            if not ids:
                continue
            topics = [self.scheme.status_topic(r) for r in ids]
            await self._paced()
            await self._subscribe(client, topics)
            await client.unsubscribe(topics, timeout=math.inf)
            self._awaited += len(topics)
            checked += len(topics)
            if asked is not None:
                asked.update(ids)
        if checked:
            await self._settle()

    async def _subscribe_wildcard(self, client: aiomqtt.Client) -> None:
        """Subscribe to every runner's status, QoS 1; the broker replays what it can queue.

        Subscribing again to the same filter replays too (MQTT 3.1.1, and MQTT 5 with
        Retain Handling 0, the default). QoS 1 numbers the messages, which is how a
        status the broker dropped is seen (`_check_packet_id`). The broker keeps its
        window in flight plus `max_queued_messages`: MQTT 5, the presence connection's
        Receive Maximum (65,535); MQTT 3.1.1, the broker's `max_inflight_messages`.
        """
        await self._subscribe(client, [self.scheme.status_filter()])

    async def _paced(self) -> None:
        """Wait until a page's replay fits: few replays awaited, a short backlog.

        A page whose runners have no retained status brings fewer replays than asked
        for; a quiet SETTLE_S forgives the rest.
        """
        page = self._page_size
        while self._awaited > page or self.backlog > page:
            self._backlog_changed.clear()
            self._replay_arrived.clear()
            waits = [self._backlog_changed.wait(), self._replay_arrived.wait()]
            try:
                await asyncio.wait_for(_first(*waits), SETTLE_S)
            except TimeoutError:
                self._awaited = 0

    async def _subscribe(self, client: aiomqtt.Client, filters: list[str]) -> None:
        """One SUBSCRIBE, QoS 1, for all `filters`; the broker replays their retained statuses.

        Its SUBACK may come behind a long replay or storm still to be read: no timeout (a
        lost connection ends the reconciliation through the reader instead).
        """
        if self.protocol == "5":
            options = SubscribeOptions(qos=1)
            await client.subscribe([(f, options) for f in filters], timeout=math.inf)
        else:
            await client.subscribe([(f, 1) for f in filters], timeout=math.inf)

    async def _settle(self) -> None:
        """Wait until the replay has come in: no replayed status for SETTLE_S."""
        while True:
            self._replay_arrived.clear()
            try:
                await asyncio.wait_for(self._replay_arrived.wait(), SETTLE_S)
            except TimeoutError:
                return


async def _chunks(ids: list[str], size: int) -> AsyncIterator[list[str]]:
    for i in range(0, len(ids), size):
        yield ids[i : i + size]


async def _nothing(_client: aiomqtt.Client) -> None:
    """A clean session has nothing to set up: the reconciliation subscribes."""


async def _first(*waits: Awaitable[object]) -> None:
    """Wait until the first of `waits` is done; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
