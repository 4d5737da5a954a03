"""Outbox (docs/design.md "Delivery"): a crash between a state change and its publish loses no
event, and a restart publishes it once.

`python -m mqtt_pairing serve` runs as a real process with the fault point
`before_publish_events` armed (`MQTT_PAIRING_FAULT_POINT`): after a pair, the process
SIGKILLs itself with the session open in Redis and its events still in the outbox (the
reply is published before the events, so the app may have it). It is then started again
without the fault, with the same client id, as a supervisor would.
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from mqtt_pairing.faults import FAULT_ENV
from mqtt_pairing.store.keys import KeySchema
from tests.fixtures import REPO_ROOT, MosquittoBroker, RedisServer
from tests.lifecycle.conftest import Peers
from tests.lifecycle.support import SECRET, Wire, history, wait_until

pytestmark = pytest.mark.timeout(90)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def serve_env(**extra: str) -> dict[str, str]:
    """The test's environment without MQTT_*, REDIS_*, PAIRING_* or a fault point."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MQTT_", "REDIS_", "PAIRING_"))
    }
    env.update(extra)
    return env


@dataclass
class Serve:
    """One `mqtt-pairing serve` process, its stderr in a log file."""

    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_connected(self, connections: int = 1) -> None:
        """Wait until the log says it connected to the broker (`connections` times in all)."""
        await wait_until(
            lambda: (
                self.output().count("connected to the broker") >= connections
                or self.process.returncode is not None
            ),
            START_TIMEOUT_S,
            "serve to connect",
            interval_s=0.05,
        )
        assert self.process.returncode is None, self.output()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


StartServe = Callable[..., Awaitable[Serve]]


@pytest.fixture
async def start_serve(
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    topic_prefix: str,
    lc_prefix: str,
    tmp_path: Path,
) -> AsyncIterator[StartServe]:
    """Factory: `await start_serve(fault=None)` starts serve with the test's settings.

    Every process shares the client id, key prefix and topic prefix of the test.
    """
    started: list[Serve] = []
    client_id = f"lc-serve:{uuid.uuid4().hex[:12]}"

    async def start(fault: str | None = None) -> Serve:
        env = serve_env(
            MQTT_URL=mosquitto_broker.url,
            REDIS_URL=redis_server.url,
            PAIRING_SECRET=SECRET,
            PAIRING_TOPIC_PREFIX=topic_prefix,
            PAIRING_KEY_PREFIX=lc_prefix,
            MQTT_CLIENT_ID=client_id,
            PAIRING_SHARED_GROUP="",
        )
        env.pop(FAULT_ENV, None)
        if fault is not None:
            env[FAULT_ENV] = fault
        log = tmp_path / f"serve-{len(started)}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mqtt_pairing",
                "serve",
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=sink,
            )
        serve = Serve(process, log)
        started.append(serve)
        await serve.wait_connected()
        return serve

    yield start
    for serve in started:
        with contextlib.suppress(ProcessLookupError):
            await serve.stop()


async def crash_after_pair(
    start_serve: StartServe, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> tuple[str, dict[str, Any]]:
    """Pair while serve crashes before publishing the events; restart it.

    Returns:
        (session_id, the pair request), once the restarted service connected.
    """
    crashing = await start_serve(fault="before_publish_events")
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code())["code"]
        request = {"code": code, "request_id": f"pair-{uuid.uuid4().hex[:8]}"}
        await app.publish_raw("pair", json.dumps(request).encode())
        await asyncio.wait_for(crashing.process.wait(), STOP_TIMEOUT_S)
        assert crashing.process.returncode == -signal.SIGKILL, crashing.output()

    # The state changed, the events wait in the outbox, none was published.
    (sid,) = rdb.hkeys(keys.runner_sessions("r1"))
    pending = [f["t"] for _, f in rdb.xrange(keys.outbox("r1"), "-", "+")]
    assert sorted(pending) == ["code.used", "session.opened"]
    assert wire.all_events() == []

    restarted = await start_serve()
    assert FAULT_ENV not in restarted.output()
    return sid, request


async def test_events_survive_a_crash_before_publish(
    start_serve: StartServe, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    sid, request = await crash_after_pair(start_serve, peers, wire, rdb, keys)
    await wire.wait_events("runner", "r1", "session.opened", timeout_s=30)
    await wire.wait_events("app", "a1", "session.opened", timeout_s=10)
    await wire.wait_events("runner", "r1", "code.used", timeout_s=10)
    # Once the outbox is drained (deleted) nothing will publish these again, and what was
    # published before the barrier's reply has reached the wire.
    await wait_until(lambda: rdb.exists(keys.outbox("r1")) == 0, 10, "the outbox to drain")
    await wire.barrier()

    # Exactly once each, counting copies on the wire (not deduplicated).
    for kind, ident in (("runner", "r1"), ("app", "a1")):
        opened = wire.events(kind, ident, "session.opened")
        assert len(opened) == 1, opened
        assert opened[0]["session"]["session_id"] == sid
    assert len(wire.events("runner", "r1", "code.used")) == 1
    assert len(wire.all_events()) == 3
    assert len({e["event_id"] for e in wire.events("runner", "r1")}) == 2
    assert (
        wire.events("runner", "r1", "session.opened")[0]["event_id"]
        == wire.events("app", "a1", "session.opened")[0]["event_id"]
    )

    # The app has (or gets, on redelivery) its reply; a retry with the same request_id
    # answers the same session and publishes nothing new. The crash came after the reply
    # but before it was remembered, so a retry within the dead attempt's pending lease
    # (PAIRING_PENDING_LEASE_S, 10 s) waits for it to run out first.
    async with peers.app("a1") as app:
        reply = await app.request("pair", request, timeout_s=20)
        assert reply["ok"], reply
        assert reply["result"]["session"]["session_id"] == sid
    await wire.barrier()
    assert len(wire.all_events()) == 3
    replies = wire.replies("app", "a1", "pair")
    assert replies
    assert all(r["ok"] and r["result"]["session"]["session_id"] == sid for r in replies)


async def test_events_recovered_after_a_crash_are_in_history(
    start_serve: StartServe, peers: Peers, wire: Wire, rdb: redis.Redis, keys: KeySchema
) -> None:
    """Events published by the recovery (drain), not right after the change, are recorded
    in the history too."""
    sid, _ = await crash_after_pair(start_serve, peers, wire, rdb, keys)
    await wire.wait_events("app", "a1", "session.opened", timeout_s=10)

    def opened(kind: str, ident: str) -> list[str]:
        records = [f for _, f in history(rdb, keys.history(kind, ident))]
        return [f["session_id"] for f in records if f["event"] == "session.opened"]

    # The history is appended once the events are out and the outbox entries deleted.
    await wait_until(
        lambda: opened("runner", "r1") and opened("app", "a1"), 10, "both history records"
    )
    assert opened("runner", "r1") == [sid]
    assert opened("app", "a1") == [sid]
