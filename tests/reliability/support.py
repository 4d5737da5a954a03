"""Helpers of the reliability tests (issue 6): faults, redelivery, crashes, instances.

- `Fleet`: many runners and apps multiplexed over one MQTT connection that reconnects by
  itself (a broker restart must not end the test's clients). Replies are matched by
  (reply topic, request_id); every reply and event received is kept, copies included, so
  tests can check that all replies to one request agree. `call_with_retries` is an app or
  runner that retries with the SAME request_id on timeout and on SERVICE_UNAVAILABLE.
- `ServeProcess`: `python -m mqtt_pairing serve` as a subprocess (SIGKILL for real), ready
  when its `/readyz` answers 200.
- `http_get`: a tiny HTTP/1.0 client for the health endpoints.
- Redis checks: claims of every code, sessions of every runner, keys without a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from types import TracebackType
from typing import Any, Self, TypeVar

import aiomqtt
import pytest
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.topics import Kind
from tests.fixtures import REPO_ROOT
from tests.service.support import Sniffer

T = TypeVar("T")

SECRET = "reliability-" + "s" * 36
CONNECT_TIMEOUT_S = 10.0
SERVE_READY_TIMEOUT_S = 30.0


def report(name: str, **numbers: Any) -> None:
    """Print measurements of a test on one line (shown with `pytest -s` or on failure)."""
    shown = " ".join(f"{key}={value}" for key, value in numbers.items())
    print(f"\n[measure] {name}: {shown}", file=sys.stderr)


async def wait_until(
    condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02
) -> float:
    """Poll `condition` until it is truthy; fail after `timeout_s`. Returns seconds waited."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        if loop.time() - started > timeout_s:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)
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


@contextlib.asynccontextmanager
async def sniffing_others(address: BrokerAddress, topic_filter: str) -> AsyncIterator[Sniffer]:
    """A `Sniffer` that never receives what it publishes itself (MQTT 5 No Local).

    For tests that publish on arbitrary topics, replies' topics included, and must tell
    the service's messages from their own.
    """
    client = aiomqtt.Client(
        address.host,
        address.port,
        identifier=f"sniffer-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[NODELAY],
        timeout=10,
    )
    async with client:
        sniffer = Sniffer(client)
        options = SubscribeOptions(qos=1, noLocal=True)
        await client.subscribe(topic_filter, options=options)
        reader = asyncio.create_task(sniffer.read())
        try:
            yield sniffer
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await reader


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
    if rest.startswith("ban:"):
        until = client.hget(key, "until_ms")
        return until is None or int(str(until)) < 0  # permanent bans only
    return rest.startswith(
        (
            "allow:",
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


# ---- HTTP probes ------------------------------------------------------------------------


async def http_get(host: str, port: int, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """GET `path` over HTTP/1.0; (status, JSON body)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


async def probe(host: str, port: int, path: str) -> int | None:
    """The status of one probe, or None when the server does not answer."""
    try:
        return (await http_get(host, port, path, timeout_s=3.0))[0]
    except (OSError, TimeoutError, IndexError, ValueError):
        return None


# ---- `serve` as a process ----------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without MQTT_*, REDIS_*, PAIRING_* settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MQTT_", "REDIS_", "PAIRING_"))
    }
    env.update(extra)
    return env


class ServeProcess:
    """`python -m mqtt_pairing serve` in a subprocess, logging to a file.

    Args:
        env: the settings (environment variables) on top of a clean environment; must
            include `PAIRING_HEALTH_LISTEN` (readiness is read from `/readyz`).
        log_path: where its stdout and stderr go.
    """

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        host, _, port = env["PAIRING_HEALTH_LISTEN"].rpartition(":")
        self.health = (host, int(port))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mqtt_pairing", "serve", "--log-level", "INFO"],
                cwd=REPO_ROOT,
                env=clean_env(**self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, timeout_s: float = SERVE_READY_TIMEOUT_S) -> float:
        """Wait until `/readyz` answers 200; seconds waited. Fails if the process exits."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while await probe(*self.health, "/readyz") != 200:
            if self.returncode is not None:
                pytest.fail(f"serve exited with {self.returncode}:\n{self.log()}")
            if loop.time() - started > timeout_s:
                pytest.fail(f"serve not ready after {timeout_s} s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return loop.time() - started

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end; its return code (negative: killed by a signal)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (code := self.returncode) is None:
            if loop.time() > deadline:
                pytest.fail(f"serve still running after {timeout_s} s:\n{self.log()}")
            await asyncio.sleep(0.02)
        return code

    def kill(self) -> None:
        """SIGKILL this process (a crash: nothing flushed, nothing acknowledged)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode
