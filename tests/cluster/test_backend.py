"""The cluster fixture is a real Redis Cluster, a pair really crosses nodes on it, and the
store's error mapping holds for cluster-only failures."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from mqtt_pairing.config import load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.errors import ConfigError, InternalError, StoreUnavailable
from mqtt_pairing.service import build_service
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from mqtt_pairing.store.keys import hash_tag
from tests.cluster.support import outcome, recording_slots, slot_of
from tests.harness.servers import RedisClusterServers, free_port
from tests.service.support import SECRET
from tests.store.helpers import Api

DEFAULT_MAX_INFLIGHT = 256
"""`PAIRING_MAX_INFLIGHT`'s default: how many requests one instance handles at once."""


def test_three_masters_each_with_a_replica_share_the_slots(
    redis_cluster: RedisClusterServers,
) -> None:
    masters, replicas = redis_cluster.masters(), redis_cluster.replicas()
    assert len(masters) == 3
    assert len(replicas) == 3
    for node in redis_cluster.nodes:
        assert node.info("cluster")["cluster_state"] == "ok"
        assert node.port + 10000 < 65536
    owners = Counter(redis_cluster.node_of_slot(s).port for s in range(0, 16384, 97))
    assert set(owners) == {m.port for m in masters}
    assert min(owners.values()) > 0.25 * sum(owners.values())


def test_the_slots_of_one_pair_lie_on_different_masters(
    redis_cluster: RedisClusterServers,
) -> None:
    """The app, code and runner slots of pairs land on several masters: the cluster tests
    exercise pairs that cross nodes, not only slots."""
    keys = KeySchema("p")
    spans: Counter[int] = Counter()
    for _ in range(100):
        app, runner, digest = (uuid.uuid4().hex for _ in range(3))
        slots = {slot_of(keys.dedupe("app", app, "pair", "x")), slot_of(keys.code(digest))}
        slots.add(slot_of(keys.runner(runner)))
        spans[len({redis_cluster.node_of_slot(s).port for s in slots})] += 1
    # three random slots on three masters: 2 in 9 of the time
    assert spans[3] > 5
    assert spans[1] < 30


async def test_a_script_call_across_slots_is_refused_on_the_cluster(
    cluster_store: PairingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the slot tests guard against: a script with keys of two tags fails here, as
    INTERNAL_ERROR (a bug, not an outage), and the recorder sees the refusal. redis-py
    refuses it before sending (RedisClusterException) or Redis does (CROSSSLOT), depending
    on what the client knows of the slots.
    """
    k = cluster_store.keys
    keys = [k.runner_sessions("r1"), k.outbox("r2")]
    assert hash_tag(keys[0]) != hash_tag(keys[1])
    assert slot_of(keys[0]) != slot_of(keys[1])
    with recording_slots(monkeypatch) as recorder, pytest.raises(InternalError):
        await cluster_store._run("close_sessions", keys, ["all", "", "", "revoked"])
    assert [r.name for r in recorder.cross_slot()] == ["close_sessions"]
    assert len(recorder.crossslot_errors()) == 1


async def test_scripts_run_on_every_master(cluster_store: PairingStore) -> None:
    """Codes issued for many runners are stored across all masters (EVALSHA is routed)."""
    for i in range(30):
        digest = uuid.uuid4().hex
        issued = await cluster_store.issue_code(
            digest, f"r{i}", max_uses=1, ttl_s=60, first_char="A"
        )
        assert issued is not None
    sizes = await cluster_store.client.dbsize(target_nodes="primaries")  # type: ignore[call-arg]
    assert sizes >= 30


async def test_no_cluster_node_reachable_is_store_unavailable() -> None:
    """redis-py raises RedisClusterException ("Redis Cluster cannot be connected"), not a
    RedisError: the store must still say SERVICE_UNAVAILABLE, not INTERNAL_ERROR."""
    url = f"redis://127.0.0.1:{free_port(with_cluster_bus=True)}"
    store = PairingStore(connect_redis(url, timeout_s=1.0, cluster=True), KeySchema("x"))
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
    finally:
        await store.aclose()


async def test_an_unreachable_cluster_url_is_a_one_line_startup_error() -> None:
    """The first PING of an unreachable REDIS_CLUSTER_URL raises RedisClusterException;
    startup must end in the one-line ConfigError, not a traceback."""
    url = f"redis://127.0.0.1:{free_port(with_cluster_bus=True)}"
    settings = load_settings(
        mqtt_url="mqtt://127.0.0.1:1", redis_cluster_url=url, pairing_secret=SECRET
    )
    try:
        service = await build_service(settings)
    except ConfigError as exc:
        message = str(exc)
    else:
        await service.close()
        pytest.fail("the service started without Redis")
    assert "Redis is unreachable" in message


async def test_a_full_inflight_window_of_pairs_is_not_service_unavailable(
    cluster_store: PairingStore, cluster_prefix: str
) -> None:
    """As many pairs at once as one instance admits, each with its own runner and app.

    Each pair batches several concurrent calls; redis-py's cluster pool (100 connections
    per node by default) raises MaxConnectionsError instead of waiting, which the store
    would report as SERVICE_UNAVAILABLE.
    """
    settings = load_settings(
        pairing_key_prefix=cluster_prefix, pairing_app_request_limit=1000, pairing_secret=SECRET
    )
    api = Api(Dispatcher(cluster_store, settings, SECRET.encode()))
    codes = [await api.code(f"r{i}") for i in range(DEFAULT_MAX_INFLIGHT)]
    replies = await asyncio.gather(*(api.pair(f"a{i}", c) for i, c in enumerate(codes)))
    assert Counter(outcome(r) for r in replies) == {"ok": DEFAULT_MAX_INFLIGHT}
