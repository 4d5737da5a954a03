"""The store's Redis connections wait when they are all busy (docs/design.md "Redis
connections"): more calls at once than the pool holds are queued, not failed.

`connect_redis(..., max_inflight=N)` holds `pool_size(N)` connections (per node on a
cluster). redis-py's own pools raise `MaxConnectionsError` at once when every connection
is in use; here 20 times as many calls as connections run at once, each a script that
keeps its connection a few milliseconds, and every one succeeds.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio.connection import AbstractConnection

from mqtt_pairing.store import PairingStore, connect_redis, transport
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.store.redis_store import RESERVED_CONNECTIONS, RawCall, pool_size
from tests.harness.servers import RedisClusterServers, RedisServer

MAX_INFLIGHT = 4
CALLS = 20 * pool_size(MAX_INFLIGHT)
_HOLD = "local t = redis.call('TIME') repeat until redis.call('TIME')[2] ~= t[2] return 1"
"""A script that keeps its connection until Redis's clock moves (a few microseconds or
more): calls overlap on the wire as they would under load."""


def test_the_pool_holds_a_connection_per_request_in_flight_and_a_reserve() -> None:
    assert pool_size(256) == 256 + RESERVED_CONNECTIONS
    assert pool_size(1) == 1 + RESERVED_CONNECTIONS


@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_more_calls_at_once_than_connections_all_succeed(
    backend: str, request: pytest.FixtureRequest
) -> None:
    if backend == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        url = cluster.url
    else:
        single: RedisServer = request.getfixturevalue("redis_server")
        url = single.url
    client = connect_redis(
        url, timeout_s=5.0, cluster=backend == "cluster", max_inflight=MAX_INFLIGHT
    )
    store = PairingStore(client, KeySchema(f"pool-{uuid.uuid4().hex[:8]}"))
    try:
        # a key of its own per call spreads the calls over every node of a cluster
        calls = [
            store.call(RawCall(("EVAL", _HOLD, 1, f"{store.keys.prefix}:{{k{i}}}")))
            for i in range(CALLS)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await store.aclose()
    failed = [r for r in results if r != 1]
    assert not failed, f"{len(failed)} of {CALLS} calls failed, e.g. {failed[:3]!r}"


def test_an_attribute_error_raised_in_redis_py_is_told_from_one_of_the_service() -> None:
    """On a cluster, redis-py's AttributeError from a connection reset under it (during a
    failover) counts as unavailability; one raised by the service's own code stays a bug."""
    with pytest.raises(AttributeError) as theirs:
        AbstractConnection.pack_command(None, "PING")  # type: ignore[arg-type]
    assert transport._raised_by_redis_py(theirs.value)
    with pytest.raises(AttributeError) as ours:
        _ = None.missing  # type: ignore[attr-defined]
    assert not transport._raised_by_redis_py(ours.value)
