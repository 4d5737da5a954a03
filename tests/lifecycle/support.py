"""Helpers of the lifecycle tests (presence, expiry, outbox, history).

Everything here talks to the real Mosquitto and Redis of the test session:

- waiting for status messages to be recorded, and for an instance to hold the presence
  lease;
- Redis helpers: Redis time, backdating a session's `last_seen_at_ms`, making its expiry
  due, reading history streams.

The service, the recorder of the wire and a runner's `StatusLink` come from the shared
harness (tests/harness/); `run_service`, `wait_until`, `Wire`, `wire_for`, `Seen`,
`StatusLink`, `clear_retained` and `OFFLINE` are compatibility names for them.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import UTC, datetime
from typing import Any

import redis

from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.harness.peers import OFFLINE, StatusLink, clear_retained
from tests.harness.recorder import Message, Recorder, pairing_filters, recording
from tests.harness.service import RunningService, run_service
from tests.harness.waiting import wait_until

SECRET = "l" * 40
CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 5.0
EVENT_TIMEOUT_S = 5.0
MASK_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]\*\*-\*\*\*-\*\*\* #[0-9a-f]{8}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse_ts(value: str) -> datetime:
    """An RFC 3339 UTC timestamp with milliseconds, as the protocol writes them."""
    assert TIMESTAMP_RE.fullmatch(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# ---- the service in-process --------------------------------------------------------------


async def wait_statuses(services: list[RunningService], count: int, timeout_s: float = 5.0):
    """Wait until the services together have recorded `count` status messages.

    With a shared group one instance at a time (the presence lease holder) records them;
    a single service records them all.
    """
    await wait_until(
        lambda: sum(s.counters["status"] for s in services) >= count,
        timeout_s,
        f"{count} status message(s) recorded by {len(services)} service(s) together",
    )


async def wait_presence_holder(service: RunningService, timeout_s: float = 5.0) -> None:
    """Wait until `service` holds the presence lease (records runners' status)."""
    await wait_until(
        lambda: service.service.gateway.records_presence,
        timeout_s,
        "the service to hold the presence lease",
    )


# ---- pairing -----------------------------------------------------------------------------


async def pair_apps(runner: RunnerClient, *apps: AppClient) -> list[dict[str, Any]]:
    """Pair every app with `runner` through one code; return the sessions (reply order)."""
    code = (await runner.request_code(max_uses=len(apps)))["code"]
    sessions = []
    for app in apps:
        sessions.append((await app.pair(code))["session"])
    return sessions


# ---- Redis -------------------------------------------------------------------------------


def redis_now_ms(rdb: redis.Redis) -> int:
    """Redis time in ms (the service takes its time from Redis, never the host)."""
    secs, micros = rdb.time()
    return int(secs) * 1000 + int(micros) // 1000


def session_json(rdb: redis.Redis, keys: KeySchema, runner_id: str, session_id: str) -> dict:
    raw = rdb.hget(keys.runner_sessions(runner_id), session_id)
    assert raw is not None, f"session {session_id} is not active in Redis"
    return dict(json.loads(raw))


def backdate_session(
    rdb: redis.Redis, keys: KeySchema, runner_id: str, session_id: str, by_ms: int
) -> int:
    """Move a session's `last_seen_at_ms` `by_ms` into the past; returns the new value.

    Its expiry-set deadline is left alone (still in the future), so the sweep does not look
    at it until `make_expiry_due`.
    """
    s = session_json(rdb, keys, runner_id, session_id)
    s["last_seen_at_ms"] = redis_now_ms(rdb) - by_ms
    rdb.hset(keys.runner_sessions(runner_id), session_id, json.dumps(s))
    return int(s["last_seen_at_ms"])


def expiry_member(runner_id: str, session_id: str) -> str:
    return f"{runner_id}\n{session_id}"


def expiry_key(keys: KeySchema, runner_id: str, shards: int = 1) -> str:
    """The expiry set of a runner's sessions: in the runner's index shard."""
    return keys.expiry(keys.shard_of(runner_id, shards))


def make_expiry_due(rdb: redis.Redis, keys: KeySchema, runner_id: str, session_id: str) -> None:
    """Make a session's idle deadline in the expiry set come due now."""
    key = expiry_key(keys, runner_id)
    member = expiry_member(runner_id, session_id)
    assert rdb.zscore(key, member) is not None, "the session is not in the expiry set"
    rdb.zadd(key, {member: redis_now_ms(rdb) - 1})


def history(rdb: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    """All entries of a history stream, oldest first."""
    return [(str(i), dict(f)) for i, f in rdb.xrange(key, "-", "+")]


# ---- compatibility names -----------------------------------------------------------------

Wire = Recorder
Seen = Message


def wire_for(
    address: BrokerAddress, prefix: str
) -> contextlib.AbstractAsyncContextManager[Recorder]:
    """A recorder of every event, reply and status under `prefix`."""
    return recording(address, *pairing_filters(prefix), prefix=prefix, label="wire")


__all__ = [
    "MASK_RE",
    "OFFLINE",
    "SECRET",
    "Seen",
    "StatusLink",
    "Wire",
    "backdate_session",
    "clear_retained",
    "expiry_key",
    "expiry_member",
    "history",
    "make_expiry_due",
    "pair_apps",
    "parse_ts",
    "redis_now_ms",
    "run_service",
    "session_json",
    "wait_presence_holder",
    "wait_statuses",
    "wait_until",
    "wire_for",
]
