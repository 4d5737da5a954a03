"""A cluster master's process is killed (SIGKILL) while pairs run; its replica takes over.

During the fault a request gets SERVICE_UNAVAILABLE or succeeds, nothing else; apps retry
with the same request_id, as docs/protocol.md asks, and every pair ends exactly once: no code
gives more than `max_uses` uses, no app gets two sessions, every session in Redis is one
that an app was told about. The service keeps running (no restart) and pairs new codes
after the failover. The master killed is the very node `REDIS_CLUSTER_URL` names.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from mqtt_pairing.config import load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.errors import StoreUnavailable
from mqtt_pairing.models import PairingSession
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from mqtt_pairing.store.redis_store import Call
from mqtt_pairing.topics import Kind
from tests.cluster.support import Swarm, outcome, slot_of
from tests.harness.servers import RedisClusterServers
from tests.service.support import SECRET, StartService
from tests.store.helpers import Api

log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
async def _close_connections_to_the_dead_master() -> AsyncIterator[None]:
    """Close what redis-py leaves open when a master dies, while this test's loop runs.

    A `ClusterNode` dropped from the topology during a failover keeps the connections that
    were in use at that moment open. redis-py closes them only when they are garbage
    collected. Collected in a later test, whose loop differs, they warn ("Unclosed
    ClusterNode", "loop is closed"), and `filterwarnings = error` would fail that
    unrelated test. Autouse, so that it is torn down after the services and stores.
    """
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


RUNNERS = 12
USES = 4
APPS_PER_RUNNER = USES + 1
"""One app more than the code has uses: it must be refused, fault or not."""
STAGGER_S = 0.1
"""Pairs start one after another this far apart (about 6 s of pairs)."""
KILL_AFTER_S = 1.5
RETRY_S = 0.25
SETTLE_TIMEOUT_S = 60.0
ALLOWED_DURING_FAULT = {"ok", "SERVICE_UNAVAILABLE", "CODE_ALREADY_USED"}


@dataclass(frozen=True, slots=True)
class Try:
    started: float
    ended: float
    outcome: str


async def _pair_until_settled(
    swarm: Swarm, app_id: str, code: str, delay_s: float
) -> tuple[list[Try], dict[str, Any]]:
    """Pair, retrying SERVICE_UNAVAILABLE with the same request_id; (tries, last reply)."""
    await asyncio.sleep(delay_s)
    rid = str(uuid.uuid4())
    tries: list[Try] = []
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while True:
            started = loop.time()
            reply = await swarm.request(Kind.APP, app_id, "pair", request_id=rid, code=code)
            tries.append(Try(started, loop.time(), outcome(reply)))
            if tries[-1].outcome != "SERVICE_UNAVAILABLE":
                return tries, reply
            await asyncio.sleep(RETRY_S)


@pytest.mark.slow
@pytest.mark.parametrize(
    "node_timeout_ms",
    [
        # a short outage: redis-py's cluster client retries across it, pairs are delayed
        pytest.param(2000, id="failover-2s"),
        # longer than the client's retries (production default: 15 s): pairs touching the
        # dead master's slots get SERVICE_UNAVAILABLE until its replica takes over
        pytest.param(6000, id="failover-6s"),
    ],
)
async def test_a_master_killed_during_pairs_doubles_nothing(
    start_cluster_service: StartService,
    swarm: Swarm,
    redis_cluster: RedisClusterServers,
    cluster_prefix: str,
    node_timeout_ms: int,
) -> None:
    # How many tries get SERVICE_UNAVAILABLE rather than a late success varies (1 to 13 of
    # about 65 at 6 s here); either is allowed, so it is logged, not asserted.
    redis_cluster.set_node_timeout(node_timeout_ms)
    try:
        await _kill_a_master_during_pairs(
            start_cluster_service, swarm, redis_cluster, cluster_prefix
        )
    finally:
        redis_cluster.set_node_timeout()


async def _kill_a_master_during_pairs(
    start_cluster_service: StartService,
    swarm: Swarm,
    redis_cluster: RedisClusterServers,
    cluster_prefix: str,
) -> dict[str, int]:
    victim = redis_cluster.masters()[0]
    running = await start_cluster_service(
        redis_cluster_url=victim.url,
        pairing_pending_lease_s=2,
        pairing_app_request_limit=1000,
        pairing_runner_code_limit=1000,
    )
    dispatcher = running.service.gateway.dispatcher
    codes: dict[str, str] = {}
    for i in range(RUNNERS):
        reply = await swarm.request(Kind.RUNNER, f"r{i}", "code", max_uses=USES)
        assert reply["ok"], reply
        codes[f"r{i}"] = reply["result"]["code"]

    jobs: list[tuple[str, str]] = [
        (f"a{i}-{j}", f"r{i}") for j in range(APPS_PER_RUNNER) for i in range(RUNNERS)
    ]

    loop = asyncio.get_running_loop()

    async def kill_and_wait() -> tuple[float, float]:
        await asyncio.sleep(KILL_AFTER_S)
        redis_cluster.kill(victim)
        killed_at = loop.time()
        await asyncio.to_thread(redis_cluster.wait_failover, victim)
        return killed_at, loop.time()

    killer = asyncio.create_task(kill_and_wait())
    results = await asyncio.gather(
        *(
            _pair_until_settled(swarm, app, codes[runner], n * STAGGER_S)
            for n, (app, runner) in enumerate(jobs)
        )
    )
    killed_at, recovered_at = await killer

    every_try = [t for tries, _reply in results for t in tries]
    outcomes = Counter(t.outcome for t in every_try)
    during = [t for t in every_try if t.started < recovered_at and t.ended > killed_at]
    log.warning(
        "failover %.1f s; replies %s; %d tries overlapped the fault, the longest %.1f s",
        recovered_at - killed_at,
        dict(outcomes),
        len(during),
        max(t.ended - t.started for t in every_try),
    )
    assert set(outcomes) <= ALLOWED_DURING_FAULT, outcomes
    assert len(during) >= RUNNERS, "the fault overlapped too few requests"
    assert swarm.not_answered_once() == []

    # every pair settled once: USES winners per code, the extra app refused. Checked with a
    # client made after the failover: without redis-py's retries, a client idle across the
    # failover fails its first call on a pooled connection to the dead master.
    told: dict[str, dict[str, str]] = {runner: {} for runner in codes}
    for (app, runner), (_seen, reply) in zip(jobs, results, strict=True):
        if reply["ok"]:
            session = reply["result"]["session"]
            assert (session["runner_id"], session["app_id"]) == (runner, app)
            told[runner][app] = session["session_id"]
    entry = redis_cluster.masters()[0]
    checker = PairingStore(
        connect_redis(entry.url, timeout_s=5.0, cluster=True), KeySchema(cluster_prefix)
    )
    try:
        for runner, code in codes.items():
            assert len(told[runner]) == USES, (runner, told[runner])
            digest = dispatcher.codes.digest(code)
            claims = await checker.client.hgetall(checker.keys.code_claims(digest))
            assert len(claims) == USES
            stored = await checker.client.hgetall(checker.keys.runner_sessions(runner))
            assert set(stored) == set(told[runner].values())  # none nobody was told of
            apps = Counter(PairingSession.model_validate_json(v).app_id for v in stored.values())
            assert max(apps.values()) == 1  # no app twice
    finally:
        await checker.aclose()

    # the same service, never restarted, issues and pairs a new code (an app retrying
    # SERVICE_UNAVAILABLE, as apps do)
    running.assert_serving()
    code = (await swarm.request(Kind.RUNNER, "r-after", "code"))["result"]["code"]
    tries, reply = await _pair_until_settled(swarm, "a-after", code, 0)
    assert reply["ok"], tries
    return dict(outcomes)


RETRY_ANSWER_BOUND_S = 3.0
"""A retry made after `retry_after_s` should be answered about as fast as a first try."""
HAMMERS = 30
LATENCY_BOUND_S = 3.0
"""What a store call may take with `REDIS_TIMEOUT_S=1`: the store's deadline,
`call_deadline_s(1.0)` = 2 s, and a second of slack for a loaded machine. A bound on
behaviour (SERVICE_UNAVAILABLE instead of a call hanging through the failover)."""


@pytest.mark.slow
async def test_calls_on_a_dead_master_fail_within_the_redis_timeout(
    redis_cluster: RedisClusterServers, cluster_prefix: str
) -> None:
    """Every call on a dead master's slots ends within the store's deadline.

    redis-py's cluster client retries a call on a dead master (10 times by default, each
    re-reading a topology that still names it), so a call used to hang for up to the
    whole failover (7 to 9 s here), and now and then raised AttributeError from a
    connection another task had just reset. The store bounds every call by
    `call_deadline_s(REDIS_TIMEOUT_S)` (2 s here) and maps both to SERVICE_UNAVAILABLE:
    nothing but SERVICE_UNAVAILABLE or success, each within `LATENCY_BOUND_S`.
    """
    victim = redis_cluster.masters()[0]
    entry = next(m for m in redis_cluster.masters() if m is not victim)
    store = PairingStore(connect_redis(entry.url, timeout_s=1.0, cluster=True), KeySchema("x"))
    await store.ping()
    digests: list[str] = []
    while len(digests) < HAMMERS:
        digest = uuid.uuid4().hex
        if redis_cluster.node_of_slot(slot_of(store.keys.code(digest))) is victim:
            digests.append(digest)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop = asyncio.Event()

    async def hammer(digest: str) -> None:
        while not stop.is_set():
            started = loop.time()
            try:
                await store.issue_code(
                    digest,
                    "r",
                    max_uses=1,
                    ttl_s=60,
                    first_char="A",
                )
            except StoreUnavailable:
                errors["SERVICE_UNAVAILABLE"] += 1
            except Exception as exc:  # counted: redis-py raises AttributeError in a race
                errors[type(exc).__name__] += 1
            latencies.append(loop.time() - started)
            await asyncio.sleep(0.05)

    redis_cluster.set_node_timeout(6000)
    tasks = [asyncio.create_task(hammer(d)) for d in digests]
    try:
        await asyncio.sleep(0.3)
        redis_cluster.kill(victim)
        await asyncio.to_thread(redis_cluster.wait_failover, victim)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        redis_cluster.set_node_timeout()
        await store.aclose()
    log.warning("longest call %.1f s; %s", max(latencies), dict(errors))
    assert set(errors) <= {"SERVICE_UNAVAILABLE"}, errors
    assert errors["SERVICE_UNAVAILABLE"] > 0, "no call met the dead master"
    assert max(latencies) <= LATENCY_BOUND_S


async def test_a_retry_after_service_unavailable_mid_pair_is_not_held_back(
    cluster_store: PairingStore, cluster_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(pairing_key_prefix=cluster_prefix, pairing_secret=SECRET)
    api = Api(Dispatcher(cluster_store, settings, SECRET.encode()))
    code = await api.code("r1")
    batch = cluster_store.batch
    failures = [StoreUnavailable(retry_after_s=2)]

    async def master_lost_once(calls: Sequence[Call]) -> list[Any]:
        # The batch that opens the session (after the claim) meets the lost master once.
        if failures and any(getattr(c, "name", "") == "open_session" for c in calls):
            raise failures.pop()
        return await batch(calls)

    monkeypatch.setattr(cluster_store, "batch", master_lost_once)
    first = await api.pair("a1", code, request_id="rid-1")
    assert first["error"]["code"] == "SERVICE_UNAVAILABLE"
    await asyncio.sleep(first["error"]["retry_after_s"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    again = await api.pair("a1", code, request_id="rid-1")
    assert again["ok"], again
    assert loop.time() - started < RETRY_ANSWER_BOUND_S
