"""Helpers of the Redis Cluster tests: a slot recorder, and a swarm of peers over MQTT.

- `SlotRecorder` wraps `PairingStore._run`, `PairingStore.call` and `PairingStore.batch`
  (for every store of the process: in-process services too) and records each Lua script
  call with its keys, its hash tags and its cluster slots, and every error a call raised.
- `Swarm` speaks for hundreds of runners and apps over one MQTT 5 connection (the test
  broker has no ACL): it publishes requests on their request topics and collects every
  reply by `request_id`, so a test can check that each request was answered exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt
import pytest
from redis.crc import key_slot

from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.keys import hash_tag
from mqtt_pairing.store.redis_store import Call, RawCall, ScriptCall
from mqtt_pairing.topics import Identity, Kind, TopicScheme

REPLY_TIMEOUT_S = 20.0


def slot_of(key: str) -> int:
    """The Redis Cluster slot of `key` (CRC16 of its hash tag, as the server computes it)."""
    return int(key_slot(key.encode()))


@dataclass(frozen=True, slots=True)
class ScriptRecord:
    """One Lua script call as the store made it."""

    name: str
    keys: tuple[str, ...]
    via: str
    """"_run" (the call itself) or "batch" (as listed in a batch)."""

    @property
    def tags(self) -> set[str]:
        return {hash_tag(k) for k in self.keys}

    @property
    def slots(self) -> set[int]:
        return {slot_of(k) for k in self.keys}


@dataclass
class SlotRecorder:
    """Every script call of every `PairingStore`, with the errors the calls raised."""

    scripts: list[ScriptRecord] = field(default_factory=list)
    raw: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    """(call name, "ExceptionType: message") of every call that raised."""

    @property
    def names(self) -> set[str]:
        return {r.name for r in self.scripts}

    def cross_slot(self) -> list[ScriptRecord]:
        """Script calls whose keys are not all of one tag and one slot."""
        return [r for r in self.scripts if len(r.tags) != 1 or len(r.slots) != 1]

    def crossslot_errors(self) -> list[tuple[str, str]]:
        """Errors that say a call spanned slots (server CROSSSLOT, client-side refusal)."""
        words = ("CROSSSLOT", "CrossSlot", "same key slot", "same slot")
        return [(n, e) for n, e in self.errors if any(w in e for w in words)]

    def assert_one_slot_each(self) -> None:
        assert self.scripts, "no script call was recorded"
        assert self.cross_slot() == []
        for record in self.scripts:
            assert record.keys, record
        assert self.crossslot_errors() == []
        # Plain commands the store batches with scripts (HDEL, DEL, SET, ZREM, EXPIRE) take
        # one key each.
        for command, keys in self.raw:
            assert len({slot_of(k) for k in keys}) <= 1, (command, keys)


@contextlib.contextmanager
def recording_slots(monkeypatch: pytest.MonkeyPatch) -> Iterator[SlotRecorder]:
    """Record the script calls of every PairingStore while the block runs.

    Script calls are recorded where the store names them (`_run`, and `batch` for the
    calls it lists); the errors are the Redis errors themselves, seen in `_guard` before
    the store turns them into domain errors (a CROSSSLOT refusal becomes INTERNAL_ERROR).
    """
    recorder = SlotRecorder()
    run, call, batch, guard = (
        PairingStore._run,
        PairingStore.call,
        PairingStore.batch,
        PairingStore._guard,
    )

    async def recorded_run(
        self: PairingStore, name: str, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:
        recorder.scripts.append(ScriptRecord(name, tuple(keys), "_run"))
        return await run(self, name, keys, args)

    async def recorded_call(self: PairingStore, c: Call) -> Any:
        if isinstance(c, RawCall):
            prefix = self.keys.prefix + ":"
            keys = tuple(str(a) for a in c.args[1:] if str(a).startswith(prefix))
            recorder.raw.append((str(c.args[0]), keys))
        return await call(self, c)

    async def recorded_batch(self: PairingStore, calls: Sequence[Call]) -> list[Any]:
        for c in calls:
            if isinstance(c, ScriptCall):
                recorder.scripts.append(ScriptRecord(c.name, c.keys, "batch"))
        return await batch(self, calls)

    async def recorded_guard(self: PairingStore, awaitable: Awaitable[Any]) -> Any:
        async def watched() -> Any:
            try:
                return await awaitable
            except Exception as exc:
                recorder.errors.append(("redis", f"{type(exc).__name__}: {exc}"))
                raise

        return await guard(self, watched())

    with monkeypatch.context() as patch:
        patch.setattr(PairingStore, "_run", recorded_run)
        patch.setattr(PairingStore, "call", recorded_call)
        patch.setattr(PairingStore, "batch", recorded_batch)
        patch.setattr(PairingStore, "_guard", recorded_guard)
        yield recorder


@dataclass
class Sent:
    """One request the swarm published, and every reply it got."""

    kind: Kind
    ident: str
    op: str
    body: dict[str, Any]
    replies: list[dict[str, Any]] = field(default_factory=list)
    publishes: int = 0
    """How many times it was published (a retry publishes the same request again)."""
    answered: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request_id(self) -> str:
        return str(self.body["request_id"])


class Swarm:
    """Many runners and apps over one MQTT 5 connection (the test broker has no ACL).

    Every reply on `P/runners/+/res/+` and `P/apps/+/res/+` is collected by its
    `request_id`; `request()` waits for the first one, `sent` keeps them all.
    """

    def __init__(self, address: BrokerAddress, prefix: str) -> None:
        self.scheme = TopicScheme(prefix)
        self.sent: dict[str, Sent] = {}
        self.unexpected: list[bytes] = []
        self._reader: asyncio.Task[None] | None = None
        self.client = aiomqtt.Client(
            address.host,
            address.port,
            identifier=f"swarm-{uuid.uuid4().hex[:12]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=[NODELAY],
            timeout=30,
            max_inflight_messages=1000,
        )
        # aiomqtt warns from 10 concurrent publishes on; a swarm has hundreds by design.
        self.client.pending_calls_threshold = 100_000

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        prefix = self.scheme.prefix
        await self.client.subscribe(f"{prefix}/runners/+/res/+", qos=1)
        await self.client.subscribe(f"{prefix}/apps/+/res/+", qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self.client.messages:
            raw = message.payload
            body_bytes = raw.encode() if isinstance(raw, str) else bytes(raw)  # type: ignore[arg-type]
            try:
                body = json.loads(body_bytes)
            except ValueError:
                self.unexpected.append(body_bytes)
                continue
            sent = self.sent.get(str(body.get("request_id")))
            if sent is None:
                self.unexpected.append(body_bytes)
                continue
            sent.replies.append(body)
            sent.answered.set()

    async def request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        *,
        request_id: str | None = None,
        timeout_s: float = REPLY_TIMEOUT_S,
        **fields: Any,
    ) -> dict[str, Any]:
        """Publish a request and return its first reply (later copies land in `sent`).

        A retry passes the `request_id` of the request it repeats.

        Raises:
            TimeoutError: no reply within `timeout_s`.
        """
        rid = request_id or str(uuid.uuid4())
        sent = self.sent.get(rid)
        if sent is None:
            sent = self.sent[rid] = Sent(kind, ident, op, {"request_id": rid, **fields})
        seen = len(sent.replies)
        sent.answered.clear()
        topic = self.scheme.request_topic(Identity(kind, ident), op)
        sent.publishes += 1
        await self.client.publish(topic, json.dumps(sent.body).encode(), qos=1)
        async with asyncio.timeout(timeout_s):
            while len(sent.replies) <= seen:
                await sent.answered.wait()
                sent.answered.clear()
        return sent.replies[seen]

    def answers(self) -> Counter[int]:
        """How many requests got how many replies: {replies: requests}."""
        return Counter(len(s.replies) for s in self.sent.values())

    def not_answered_once(self) -> list[Sent]:
        """Requests that did not get exactly one reply per publish."""
        return [s for s in self.sent.values() if len(s.replies) != s.publishes]

    def requests_of(self, op: str) -> list[Sent]:
        return [s for s in self.sent.values() if s.op == op]


def outcome(reply: dict[str, Any]) -> str:
    """ "ok" or the error code of a reply."""
    if reply.get("ok"):
        return "ok"
    return str(reply["error"]["code"])


async def bounded(limit: int, jobs: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run `jobs` with at most `limit` at once; results in job order."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


def group_by(items: Sequence[Any], key: Callable[[Any], str]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = defaultdict(list)
    for item in items:
        grouped[key(item)].append(item)
    return dict(grouped)
