"""On the cluster, every Lua script call of everything the service and the admin commands
do keeps to one hash tag and one slot, and no call is refused for spanning slots.

The calls are recorded by wrapping `PairingStore._run` / `call` / `batch` / `_guard`
(`tests.cluster.support.recording_slots`), so batched and reloaded scripts are seen too;
the flow runs on the real cluster, where a script spanning slots fails.
"""

from __future__ import annotations

import time

import pytest

from mqtt_pairing.admin import AdminService
from mqtt_pairing.config import Settings, load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import OutboxRelay
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.redis_store import SCRIPT_NAMES
from mqtt_pairing.topics import Kind
from tests.cluster.support import recording_slots
from tests.harness.servers import RedisClusterServers
from tests.service.support import SECRET
from tests.store.helpers import Api, full_flow

SHARDS = 4


def _settings(prefix: str) -> Settings:
    return load_settings(
        pairing_key_prefix=prefix,
        pairing_secret=SECRET,
        pairing_index_shards=SHARDS,
        pairing_global_fail_shards=SHARDS,
    )


async def _published(_events: list[Event]) -> None:
    return None


async def test_every_script_call_of_a_full_flow_keeps_to_one_slot(
    cluster_store: PairingStore, cluster_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(cluster_prefix)
    api = Api(Dispatcher(cluster_store, settings, SECRET.encode()))
    store = cluster_store
    relay = OutboxRelay(store, settings, _published, api.d.history)
    admin = AdminService(store, settings, actor="tests")
    idle = settings.pairing_session_idle_ttl_s
    with recording_slots(monkeypatch) as recorder:
        # every op of runners and apps, through the dispatcher (pairs cross three slots)
        await full_flow(api)
        # presence: status messages and the heartbeat
        for state in ("offline", "online"):
            await store.record_status(
                "r5", state, retained=False, heartbeat_online_s=30, idle_ttl_s=idle
            )
        assert set(await store.presence(["r1", "r5", "nobody"])) == {"r1", "r5", "nobody"}
        assert await store.hold_presence_lease("tests", lease_s=5)
        await store.hold_presence_lease("tests", lease_s=5, release=True)
        # the outbox relay: recovery scan, due marks, the sweep
        assert await relay.recover() >= 1
        await store.mark_outbox_due("r5", delay_s=0, shards=SHARDS)
        # a pair's marks by script (when its first batch's Redis time is too old)
        await store.batch(
            store.open_marks_calls("r5", "s-marks", lease_s=1, idle_ttl_s=idle, shards=SHARDS)
        )
        await relay.sweep_once()
        # expiry: a session still alive moves its deadline; an idle one is closed
        code = await api.code("r6", max_uses=2)
        sid = await api.pair_ok("a8", code)
        for shard in range(SHARDS):
            await store.claim_due_expiries(shard, limit=10, lease_s=1)
        assert (await store.expire_session("r6", sid, idle_ttl_s=idle, shards=SHARDS))[0] is None
        closed, _outbox = await store.expire_session("r6", sid, idle_ttl_s=0, shards=SHARDS)
        assert closed is not None
        # the admin commands
        code = await api.code("r7", max_uses=3)
        sid = await api.pair_ok("a9", code)
        await api.pair_ok("a10", code)
        assert (await admin.revoke_session(sid)).session_id == sid
        assert len(await admin.revoke_runner_sessions("r7")) == 1
        await admin.add_ban("app", "bad", duration_s=60, reason="tests")
        await admin.remove_ban("app", "bad")
        await admin.set_allowed("app", "friend", True)
        await admin.list_bans()
        await admin.list_sessions()
        await admin.list_codes()
        await admin.revoke_code("r5")
        page = await admin.history(limit=500)
        assert {r.entry.event for r in page.records} >= {"pair.succeeded", "session.closed"}
        await admin.history(runner_id="r1")
        await admin.history(app_id="a1")
        await admin.stats(3600)
        assert (await api.request(Kind.APP, "a1", "sessions"))["ok"]
        # the tombstone lookup on its own (claim_code makes the same one)
        layout = api.settings.tombstones
        await store.find_tombstone(layout, api.digest(code), int(time.time() * 1000))
    recorder.assert_one_slot_each()
    assert recorder.errors == []
    assert recorder.names == set(SCRIPT_NAMES)


async def test_a_cold_script_cache_on_every_node_keeps_to_one_slot(
    cluster_store: PairingStore,
    cluster_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    redis_cluster: RedisClusterServers,
) -> None:
    """After SCRIPT FLUSH on every node, scripts are reloaded (EVALSHA, NOSCRIPT,
    SCRIPT LOAD, EVALSHA) on the node of their slot, and a pair still works."""
    api = Api(Dispatcher(cluster_store, _settings(cluster_prefix), SECRET.encode()))
    code = await api.code("r1", max_uses=2)
    for node in redis_cluster.nodes:
        with node.client() as client:
            client.script_flush()
    with recording_slots(monkeypatch) as recorder:
        await api.pair_ok("a1", code)
        await api.pair_ok("a2", code)
    recorder.assert_one_slot_each()
    assert recorder.errors == []
    sha = cluster_store._scripts["claim_code"].sha
    reloaded = []
    for node in redis_cluster.masters():
        with node.client() as client:
            reloaded.append(client.script_exists(sha)[0])
    assert any(reloaded)
