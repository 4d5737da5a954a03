"""Helpers of the reliability tests (issue 6): faults, redelivery, crashes, instances.

- `Fleet`: many runners and apps multiplexed over one MQTT connection that reconnects by
  itself (a broker restart must not end the test's clients). Replies are matched by
  (reply topic, request_id); every reply and event received is kept, copies included, so
  tests can check that all replies to one request agree. `call_with_retries` is an app or
  runner that retries with the SAME request_id on timeout and on SERVICE_UNAVAILABLE.
- Redis checks: claims of every code, sessions of every runner, keys without a TTL.

`ServeProcess`, `clean_env`, `http_get`, `probe` (tests/harness/serve.py), `wait_until`
(tests/harness/waiting.py) and `sniffing_others` (a harness recorder with No Local) are
the shared harness's; the names are kept here for the tests that import them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from statistics import median
from types import TracebackType
from typing import Any, Self, TypeVar

import aiomqtt
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.topics import Kind
from tests.harness import waiting
from tests.harness.recorder import Recorder, recording
from tests.harness.serve import ServeProcess, clean_env, http_get, probe

T = TypeVar("T")

SECRET = "reliability-" + "s" * 36
CONNECT_TIMEOUT_S = 10.0

__all__ = [
    "SECRET",
    "Attempted",
    "Fleet",
    "ServeProcess",
    "Try",
    "app_sessions",
    "bounded",
    "clean_env",
    "code_claims",
    "exempt_from_ttl",
    "http_get",
    "issue_codes",
    "keys_without_ttl",
    "probe",
    "report",
    "runner_sessions",
    "scan",
    "sniffing_others",
    "summary",
    "wait_until",
]


def report(name: str, **numbers: Any) -> None:
    """Print measurements of a test on one line (shown with `pytest -s` or on failure)."""
    shown = " ".join(f"{key}={value}" for key, value in numbers.items())
    print(f"\n[measure] {name}: {shown}", file=sys.stderr)


async def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02
) -> float:
    """The harness's `wait_until`, returning the seconds waited (for reports)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await waiting.wait_until(condition, timeout_s, what, interval_s)
    return loop.time() - started


def summary(values: Iterable[float]) -> str:
    """`n/median/max` of some durations (seconds), for reports."""
    items = sorted(values)
    if not items:
        return "n=0"
    return f"n={len(items)} median={median(items):.3f}s max={items[-1]:.3f}s"


# ---- many peers over one connection -----------------------------------------------------


@dataclass(frozen=True)
class Try:
    """One attempt of a request: when it was sent, how long its reply took, what it said."""

    sent_at: float
    """Event-loop time of the publish."""
    latency_s: float | None
    """Seconds from the publish to the reply; None: no reply within the attempt timeout
    (or the publish failed)."""
    outcome: str | None
    """"ok", the error code of the reply, or None (no reply)."""


@dataclass
class Attempted:
    """How one request ended after retries."""

    reply: dict[str, Any] | None
    """The final reply (None: no reply after every attempt)."""
    attempts: int
    elapsed_s: float
    timeouts: int = 0
    unavailable_s: list[float] = field(default_factory=list)
    """How long each SERVICE_UNAVAILABLE reply took to come, seconds."""
    tries: list[Try] = field(default_factory=list)
    """Every attempt, answered or not, in order."""

    @property
    def ok(self) -> bool:
        return bool(self.reply and self.reply.get("ok"))

    @property
    def error_code(self) -> str | None:
        if self.reply is None or self.reply.get("ok"):
            return None
        return str(self.reply["error"]["code"])


class Fleet:
    """Runners and apps multiplexed over one MQTT 5 connection that reconnects by itself.

    Args:
        address: the broker.
        prefix: the topic prefix.
        filters: what to subscribe to (QoS 1), e.g. `P/apps/+/res/+`.
        persistent: keep the broker session (clean start off, a fixed client id and a
            session expiry), so events published while the fleet is away reach it later.
    """

    def __init__(
        self,
        address: BrokerAddress,
        prefix: str,
        filters: Iterable[str],
        *,
        name: str = "fleet",
        persistent: bool = False,
    ) -> None:
        self.address = address
        self.prefix = prefix
        self.filters = list(filters)
        self.persistent = persistent
        self.client_id = f"{name}-{uuid.uuid4().hex[:10]}"
        self.connected = asyncio.Event()
        self.connects = 0
        self.replies: defaultdict[tuple[str, str | None], list[dict[str, Any]]] = defaultdict(list)
        """(reply topic, request_id) -> every reply received, copies included."""
        self.events: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        """events topic -> every event received, copies included."""
        self._waiting: dict[tuple[str, str], asyncio.Future[dict[str, Any]]] = {}
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def base(self, kind: Kind, ident: str) -> str:
        return f"{self.prefix}/{kind.segment}/{ident}"

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), CONNECT_TIMEOUT_S)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task

    def _make_client(self) -> aiomqtt.Client:
        kwargs: dict[str, Any] = {}
        if self.persistent:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 300
            kwargs.update(clean_start=False, properties=props)
        return aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=[NODELAY],
            timeout=5,
            **kwargs,
        )

    async def _run(self) -> None:
        while not self._closing:
            client = self._make_client()
            try:
                async with client:
                    for topic_filter in self.filters:
                        await client.subscribe(topic_filter, qos=1)
                    self._client = client
                    self.connects += 1
                    self.connected.set()
                    async for message in client.messages:
                        self._on_message(message)
            except aiomqtt.MqttError:
                pass
            finally:
                self._client = None
                self.connected.clear()
            await asyncio.sleep(0.1)

    def _on_message(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        raw = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        try:
            body = json.loads(bytes(raw))
        except ValueError:
            body = {"unparseable": bytes(raw).decode(errors="replace")}
        topic = message.topic.value
        if topic.endswith("/events"):
            self.events[topic].append(body)
            return
        rid = body.get("request_id") if isinstance(body, dict) else None
        self.replies[(topic, rid)].append(body)
        if rid is not None:
            future = self._waiting.pop((topic, rid), None)
            if future is not None and not future.done():
                future.set_result(body)

    async def publish(self, topic: str, payload: bytes, *, connect_wait_s: float = 15.0) -> None:
        """Publish at QoS 1 once connected (waiting for a reconnection if need be).

        Raises:
            TimeoutError: not connected within `connect_wait_s`.
            aiomqtt.MqttError: the connection failed during the publish.
        """
        await asyncio.wait_for(self.connected.wait(), connect_wait_s)
        client = self._client
        if client is None:
            raise aiomqtt.MqttError("not connected")
        await client.publish(topic, payload, qos=1)

    async def request(
        self, kind: Kind, ident: str, op: str, body: dict[str, Any], timeout_s: float
    ) -> dict[str, Any]:
        """Publish one request and wait for its reply (by reply topic and request_id).

        Raises:
            TimeoutError: no reply within `timeout_s` (the publish included).
            aiomqtt.MqttError: the publish failed.
        """
        base = self.base(kind, ident)
        key = (f"{base}/res/{op}", str(body["request_id"]))
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        try:
            async with asyncio.timeout(timeout_s):
                await self.publish(f"{base}/req/{op}", json.dumps(body).encode())
                return await future
        finally:
            if self._waiting.get(key) is future:
                del self._waiting[key]

    async def call_with_retries(
        self,
        kind: Kind,
        ident: str,
        op: str,
        body: dict[str, Any],
        *,
        attempt_timeout_s: float = 3.0,
        max_attempts: int = 6,
        unavailable_pause_s: float | None = None,
    ) -> Attempted:
        """A client that retries the same request (same request_id) until it is answered.

        It retries on a timeout, on a failed publish and on SERVICE_UNAVAILABLE (after
        `retry_after_s`, or `unavailable_pause_s` when given); any other reply ends it.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = Attempted(None, 0, 0.0)
        while result.attempts < max_attempts:
            result.attempts += 1
            sent = loop.time()
            try:
                reply = await self.request(kind, ident, op, body, attempt_timeout_s)
            except (TimeoutError, aiomqtt.MqttError):
                result.timeouts += 1
                result.tries.append(Try(sent, None, None))
                await asyncio.sleep(0.05)  # a pause between attempts, not a wait for state
                continue
            error = reply.get("error") or {}
            outcome = "ok" if reply.get("ok") else str(error.get("code"))
            result.tries.append(Try(sent, loop.time() - sent, outcome))
            if not reply.get("ok") and error.get("code") == "SERVICE_UNAVAILABLE":
                result.unavailable_s.append(loop.time() - sent)
                pause = unavailable_pause_s
                await asyncio.sleep(error["retry_after_s"] if pause is None else pause)
                continue
            result.reply = reply
            break
        result.elapsed_s = loop.time() - started
        return result

    def all_replies(self, kind: Kind, ident: str, op: str, request_id: str) -> list[Any]:
        """Every reply received for one request (copies included)."""
        return self.replies.get((f"{self.base(kind, ident)}/res/{op}", request_id), [])

    def distinct_events(self, kind: Kind, ident: str, name: str) -> dict[str, dict[str, Any]]:
        """Events `name` received by one peer, by event_id (copies dropped)."""
        found = self.events.get(f"{self.base(kind, ident)}/events", [])
        return {e["event_id"]: e for e in found if e.get("event") == name}


async def bounded(coroutines: Iterable[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """Run coroutines with at most `limit` at a time; their results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coroutine: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await coroutine

    return list(await asyncio.gather(*(one(c) for c in coroutines)))


async def issue_codes(
    fleet: Fleet, runner_ids: list[str], *, limit: int = 100, **fields: Any
) -> dict[str, str]:
    """runner_id -> a fresh code for each runner (retrying; fails the test if one fails)."""

    async def one(runner_id: str) -> tuple[str, str]:
        body = {"request_id": f"code-{uuid.uuid4().hex}", **fields}
        got = await fleet.call_with_retries(
            Kind.RUNNER, runner_id, "code", body, attempt_timeout_s=5, max_attempts=4
        )
        assert got.ok, (runner_id, got)
        assert got.reply is not None
        return runner_id, str(got.reply["result"]["code"])

    return dict(await bounded((one(r) for r in runner_ids), limit))


def sniffing_others(
    address: BrokerAddress, topic_filter: str
) -> contextlib.AbstractAsyncContextManager[Recorder]:
    """A recorder that never receives what it publishes itself (MQTT 5 No Local).

    For tests that publish on arbitrary topics, replies' topics included, and must tell
    the service's messages from their own.
    """
    return recording(address, topic_filter, no_local=True, label="sniffer")


# ---- Redis checks -----------------------------------------------------------------------


def scan(client: redis.Redis, pattern: str) -> list[str]:
    return sorted(str(k) for k in client.scan_iter(match=pattern, count=1000))


def code_claims(client: redis.Redis, prefix: str) -> dict[str, dict[str, str]]:
    """claims key -> {"app_id\\nrequest_id": session_id} for every code of the prefix."""
    out: dict[str, dict[str, str]] = {}
    for key in scan(client, f"{prefix}:code:*:claims"):
        raw: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
        out[key] = {field: value.split("\t", 1)[0] for field, value in raw.items()}
    return out


def runner_sessions(client: redis.Redis, keys: KeySchema, runner_id: str) -> dict[str, Any]:
    """session_id -> session (internal JSON) of one runner's active sessions."""
    raw: dict[str, str] = client.hgetall(keys.runner_sessions(runner_id))  # type: ignore[assignment]
    return {sid: json.loads(value) for sid, value in raw.items()}


def app_sessions(client: redis.Redis, keys: KeySchema, app_id: str) -> dict[str, str]:
    """session_id -> runner_id of one app's session index."""
    return client.hgetall(keys.app_sessions(app_id))  # type: ignore[return-value]


def exempt_from_ttl(prefix: str, key: str, client: redis.Redis) -> bool:
    """Keys docs/design.md lets live without a TTL ("Redis keys" and the issue's list)."""
    rest = key.removeprefix(f"{prefix}:")
    if rest.startswith("limit:") and rest.endswith("}"):
        # a permanent ban or the allowlist keeps the identity's limit hash
        ban_until, allow = client.hmget(key, ["ban_until_ms", "allow"])  # type: ignore[misc]
        return ban_until == "-1" or allow == "1"
    return rest.startswith(
        (
            "budget:{global:",
            "expiry:{global:",
            "outbox-due:{global:",
            "outbox:{runner:",
            "history:{global:",
        )
    )


def keys_without_ttl(client: redis.Redis, prefix: str) -> list[str]:
    """Keys of the prefix that have no TTL and are not exempt (should be none)."""
    return [
        key
        for key in scan(client, f"{prefix}:*")
        if client.ttl(key) == -1 and not exempt_from_ttl(prefix, key, client)
    ]
