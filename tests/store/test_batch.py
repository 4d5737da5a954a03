"""The store's own Redis call machinery: `batch`, `call`, and the service's command packer.

On a single Redis, `batch` and `call` send their commands on a pooled connection
themselves (not through redis-py's Pipeline), and `connect_redis` packs commands in one
piece (hiredis when installed); these tests hold them to redis-py's behaviour: replies in
order shaped by the client's response callbacks, an error reply refused without leaving
the connection out of step, NOSCRIPT reloads, the same bytes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from redis.asyncio.connection import Connection

from mqtt_pairing.errors import InternalError, StoreUnavailable
from mqtt_pairing.store import PairingStore, connect_redis, transport
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.store.redis_store import RawCall


def _key(store: PairingStore, name: str) -> str:
    return f"{store.keys.prefix}:{{batch}}:{name}"


async def test_a_batch_returns_replies_in_order_as_redis_py_shapes_them(
    store: PairingStore,
) -> None:
    # On a cluster the calls of a batch run concurrently: no call depends on another.
    a, b, c = _key(store, "a"), _key(store, "b"), _key(store, "c")
    writes = [RawCall(("SET", a, "3")), RawCall(("HSET", b, "f", "v")), RawCall(("INCRBY", c, 2))]
    assert await store.batch(writes) == [True, 1, 2]
    reads = [
        RawCall(("GET", a)),
        RawCall(("EXPIRE", a, 60)),
        RawCall(("HGETALL", b)),
        RawCall(("EXISTS", _key(store, "none"))),
    ]
    assert await store.batch(reads) == ["3", True, {"f": "v"}, 0]
    assert await store.call(RawCall(("SET", a, "x", "NX"))) is None


async def test_an_error_reply_fails_the_batch_and_the_next_call_is_in_step(
    store: PairingStore,
) -> None:
    a = _key(store, "a")
    assert await store.call(RawCall(("SET", a, "text"))) is True
    with pytest.raises(InternalError):
        await store.batch([RawCall(("GET", a)), RawCall(("INCR", a)), RawCall(("STRLEN", a))])
    with pytest.raises(InternalError):
        await store.call(RawCall(("INCR", a)))
    assert await store.call(RawCall(("GET", a))) == "text"
    assert await store.batch([RawCall(("GET", a)), RawCall(("STRLEN", a))]) == ["text", 4]


async def test_scripts_flushed_before_a_call_or_a_batch_are_reloaded(store: PairingStore) -> None:
    mark = store.outbox_due_call("r1", delay_s=5, shards=4)
    due_key = store.keys.outbox_due(store.keys.shard_of("r1", 4))
    first = await store.call(mark)
    await store.client.script_flush()
    assert await store.call(mark) >= first  # ran again; the earlier due time is kept
    assert int(await store.client.zscore(due_key, "r1")) == first
    await store.client.script_flush()
    again, none = await store.batch([mark, RawCall(("GET", _key(store, "none")))])
    assert again >= first
    assert none is None
    assert int(await store.client.zscore(due_key, "r1")) == first


_COMMANDS: list[tuple[Any, ...]] = [
    ("EVALSHA", "0" * 40, 2, "p:{r:1}:a", "p:{r:1}:b", "r1", 5000, 2.5, -3, 10**30, 1e-7),
    ("SET", "k", "é✓ and more", "EX", 5),
    ("SET", "k", "v" * 10_000),
    ("SET", b"k", b"raw\x00bytes", memoryview(b"view")),
    ("SCRIPT LOAD", "return 1"),
    (b"CONFIG GET", "maxmemory"),
    ("ZADD", "k", float("inf"), "m", -0.0, "n"),
]


def test_the_packer_sends_what_redis_py_sends() -> None:
    ours, theirs = transport._PackOnceConnection(), Connection()
    for args in _COMMANDS:
        assert b"".join(ours.pack_command(*args)) == b"".join(theirs.pack_command(*args)), args
    assert b"".join(ours.pack_commands(_COMMANDS)) == b"".join(theirs.pack_commands(_COMMANDS))
    for bad in (True, None, object()):
        with pytest.raises(Exception) as ours_error:
            ours.pack_command("SET", "k", bad)
        with pytest.raises(Exception) as theirs_error:
            theirs.pack_command("SET", "k", bad)
        assert type(ours_error.value) is type(theirs_error.value)


async def test_the_service_client_packs_with_its_own_connections(store_redis_url: str) -> None:
    client = connect_redis(store_redis_url)
    try:
        assert issubclass(client.connection_pool.connection_class, transport._PackOnce)
        store = PairingStore(client, KeySchema("batch-test"))
        a = _key(store, "a")
        assert await store.batch([RawCall(("SET", a, "é")), RawCall(("GET", a))]) == [True, "é"]
        assert await store.call(store.outbox_due_call("r1", delay_s=5, shards=4)) is not None
    finally:
        await client.aclose()


async def test_a_silent_redis_times_out_the_batch_not_the_service() -> None:
    # A server that takes the commands and never answers: the whole exchange runs under
    # one timeout (not one per reply), the connection is dropped and its own socket
    # timeout is back in place for redis-py's other calls.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect_redis(f"redis://127.0.0.1:{port}", timeout_s=0.2)
    store = PairingStore(client, KeySchema("silent"))
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        with pytest.raises(StoreUnavailable):
            await store.batch([RawCall(("GET", "a")), RawCall(("GET", "b"))])
        assert loop.time() - started < 3.0  # the timeout, and redis-py's retries of it
        pool = client.connection_pool
        idle = list(pool._available_connections)
        assert idle, "the connection went back to the pool"
        assert all(c.socket_timeout == 0.2 for c in idle)
        assert not any(c.is_connected for c in idle)
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
