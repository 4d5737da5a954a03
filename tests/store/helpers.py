"""Helpers of the store tests: key dumps, Redis time, round trips, the whole flow.

`Api` (requests through a Dispatcher), `CODE_FIELDS` and `new_id` are the shared
harness's (tests/harness/api.py); the names are kept here for the store tests.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Sequence
from contextvars import ContextVar
from typing import Any

import pytest
import redis.asyncio as aioredis

from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.keys import hash_tag
from mqtt_pairing.store.redis_store import Call
from mqtt_pairing.topics import Kind
from tests.harness.api import CODE_FIELDS, Api, new_id

SECRET = b"s" * 32

__all__ = ["CODE_FIELDS", "SECRET", "Api", "new_id"]
TAG_PATTERN = re.compile(r"(runner|app|session|global):[A-Za-z0-9._-]+|c:[0-9a-f]{2}")


def error_code(reply: dict[str, Any] | None) -> str | None:
    """The error code of a reply, or None when it is ok."""
    assert reply is not None
    if reply["ok"]:
        return None
    code: str = reply["error"]["code"]
    return code


_IN_BATCH: ContextVar[bool] = ContextVar("in_batch", default=False)


class RoundTrips:
    """Counts the round trips a store's caller waits for, one after another.

    `PairingStore.round_trips` counts a single Redis pipeline as one, but on a cluster
    `batch` sends its calls concurrently (the cluster's pipelines refuse EVALSHA) and
    counts each of them. Here a batch is one round trip on every engine, whatever it
    holds, and every other store call is one.
    """

    def __init__(self, store: PairingStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        guard, batch = store._guard, store.batch

        async def counted_guard(awaitable: Awaitable[Any]) -> Any:
            if not _IN_BATCH.get():
                self.count += 1
            return await guard(awaitable)

        async def counted_batch(calls: Sequence[Call]) -> list[Any]:
            if _IN_BATCH.get() or not calls:
                return await batch(calls)
            self.count += 1
            token = _IN_BATCH.set(True)  # seen by the calls it runs, and their tasks
            try:
                return await batch(calls)
            finally:
                _IN_BATCH.reset(token)

        monkeypatch.setattr(store, "_guard", counted_guard)
        monkeypatch.setattr(store, "batch", counted_batch)


async def failures_logged(store: PairingStore, kind: Kind, ident: str) -> int:
    """Failed guesses in the identity's failure log (the limit hash's `fl`, any age)."""
    log = await store.client.hget(store.keys.limit(kind, ident), "fl")
    return len((log or "").split())


async def redis_now_ms(client: aioredis.Redis) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def all_keys(client: aioredis.Redis, prefix: str) -> list[str]:
    """Every key under `prefix:` (SCAN, so it works on a shared server; on a cluster
    redis-py scans every master)."""
    return sorted([key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)])


async def dump_key(client: aioredis.Redis, key: str) -> str:
    """The key's name and everything it holds, as text (for searching)."""
    kind = await client.type(key)
    parts: list[str] = [key, kind]
    if kind == "string":
        # tombstone strings hold binary records (mqtt_pairing/tombstones.py)
        raw = await client.execute_command("GET", key, NEVER_DECODE=True)  # type: ignore[no-untyped-call]
        parts.append(bytes(raw).decode("latin-1"))
    elif kind == "hash":
        for field, value in (await client.hgetall(key)).items():
            parts.extend((field, value))
    elif kind == "zset":
        for member, score in await client.zrange(key, 0, -1, withscores=True):
            parts.extend((member, repr(score)))
    elif kind == "set":
        parts.extend(await client.smembers(key))
    elif kind == "list":
        parts.extend(await client.lrange(key, 0, -1))
    elif kind == "stream":
        for entry_id, fields in await client.xrange(key):
            parts.append(entry_id)
            for field, value in fields.items():
                parts.extend((field, value))
    elif kind != "none":
        raise AssertionError(f"unexpected key type {kind} of {key}")
    return "\n".join(parts)


def tags_of(keys: list[str]) -> set[str]:
    return {hash_tag(k) for k in keys}


async def full_flow(api: Api, *, runner_ops_through_dispatcher: bool = True) -> list[str]:
    """Everything the service does to the store, once; returns every code issued.

    With `runner_ops_through_dispatcher=False`, runner `cancel-code` and `unpair` go to
    the services directly (skipping the dispatcher's finish step, see test_slots.py).
    """
    store, client = api.store, api.store.client
    codes: list[str] = []
    # r1: a code with metadata, replaced by a multi-use one; two apps pair, one fails.
    codes.append(
        await api.code(
            "r1",
            runner_name="Runner One",
            metadata={"os": "linux"},
            public_key="pk-r1",
            max_uses=3,
        )
    )
    codes.append(await api.code("r1", max_uses=3))
    await api.pair_ok("a1", codes[1], app_name="App One", public_key="pk-a1")
    s2 = await api.pair_ok("a2", codes[1], metadata={"model": "x"})
    assert error_code(await api.pair("a3", codes[0])) == "CODE_ALREADY_USED"
    assert error_code(await api.pair("a3", "000-000-000")) == "CODE_NOT_FOUND"
    assert error_code(await api.pair("a4", "not a code")) == "INVALID_FORMAT"
    # an automatic penalty for "guesser", and a failure window left open for "a3"
    for _ in range(api.settings.pairing_fail_limit):
        assert error_code(await api.pair("guesser", "ZZZ-ZZZ-ZZZ")) == "CODE_NOT_FOUND"
    assert error_code(await api.pair("guesser", "ZZZ-ZZZ-ZZZ")) == "RATE_LIMITED"
    # listing, status, heartbeat
    assert (await api.request(Kind.RUNNER, "r1", "sessions"))["ok"]
    assert (await api.request(Kind.APP, "a1", "sessions"))["ok"]
    assert (await api.request(Kind.APP, "a1", "status"))["ok"]
    assert (await api.handle(Kind.RUNNER, "r1", "heartbeat", {})).reply is None
    # a message each way (the session is only read)
    for kind, ident in ((Kind.RUNNER, "r1"), (Kind.APP, "a2")):
        reply = await api.request(kind, ident, "message", session_id=s2, data={"n": 1})
        assert reply["ok"], reply
    # app unpair, runner unpair
    reply = await api.request(Kind.APP, "a2", "unpair", session_id=s2)
    assert reply["ok"], reply
    # r2: cancel-code; r3: a runner ban (cancels its code); r4: an offline runner
    codes.append(await api.code("r2"))
    codes.append(await api.code("r3"))
    codes.append(await api.code("r4", max_uses=2))
    if runner_ops_through_dispatcher:
        reply = await api.request(Kind.RUNNER, "r2", "cancel-code")
        assert reply["result"] == {"cancelled": True}
        reply = await api.request(Kind.RUNNER, "r1", "unpair", app_id="a1")
        assert reply["result"] == {"closed": 1}
    else:
        assert await api.d.codes.cancel("r2") is True
        closed, _events = await api.d.sessions.close_for_runner("r1", app_id="a1")
        assert len(closed) == 1
    await store.set_ban("runner", "r3", reason="test", by="tests", duration_s=3600)
    assert error_code(await api.pair("a5", codes[3])) == "CODE_ALREADY_USED"
    await client.hset(
        store.keys.runner("r4"),
        mapping={"status": "offline", "status_ms": await redis_now_ms(client)},
    )
    assert error_code(await api.pair("a6", codes[4])) == "RUNNER_OFFLINE"
    await client.hdel(store.keys.runner("r4"), "status", "status_ms")
    # r5: a live code with a use left and a live session at the end
    codes.append(await api.code("r5", max_uses=2))
    await api.pair_ok("a7", codes[5])
    # bans and the allowlist
    await store.set_ban("app", "banned-for-a-while", reason="test", by="tests", duration_s=3600)
    await store.set_ban("app", "banned-for-good", reason="test", by="tests", duration_s=None)
    await store.set_ban("runner", "r-banned-for-good", reason="test", by="tests", duration_s=None)
    assert error_code(await api.pair("banned-for-a-while", codes[5])) == "BANNED"
    await store.set_allowed("app", "vip", True)
    assert error_code(await api.pair("vip", "YYY-YYY-YYY")) == "CODE_NOT_FOUND"
    return codes
