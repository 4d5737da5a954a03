"""Redis faults: a 5 s outage under load, and `SCRIPT FLUSH` (issue 6, second and third).

Outage: a private redis-server (append-only file on, so a graceful stop loses nothing)
is stopped for 5 s (`stop`: connections refused) or frozen with SIGSTOP for 5 s (`freeze`:
commands time out, and the ones already sent run when it wakes up) while apps keep
pairing. Every attempt of every app, before, during and after the outage, is answered
within `ANSWER_BOUND_S` (the service's `REDIS_TIMEOUT_S` and some scheduling slack): an
attempt left unanswered for `ATTEMPT_TIMEOUT_S` fails the test, it is not just retried.
During the outage the answer is SERVICE_UNAVAILABLE with `retry_after_s`; afterwards the
same service (not restarted) pairs every app that retries with the same request_id,
nothing stays stuck, no reply is INTERNAL_ERROR, and no key is left without a TTL except
those docs/design.md exempts.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.topics import Kind
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.reliability.conftest import ServiceOn
from tests.reliability.support import (
    Attempted,
    Fleet,
    app_sessions,
    code_claims,
    issue_codes,
    keys_without_ttl,
    report,
    runner_sessions,
    summary,
    wait_until,
)
from tests.service.support import Peers, StartService

APPS = 120
STAGGER_S = 0.06
"""App i starts pairing at i * STAGGER_S: the load spans the outage (about 7 s)."""
OUTAGE_AT_S = 1.0
OUTAGE_S = 5.0
REDIS_TIMEOUT_S = 1.0
ANSWER_BOUND_S = REDIS_TIMEOUT_S + 1.5
"""Every attempt is answered within this: a store call gives up after REDIS_TIMEOUT_S, and
the rest is slack for a loaded machine (this test's 240 clients share the service's loop).
It is a bound on behaviour (the service answers while Redis cannot), not a speed figure."""
ATTEMPT_TIMEOUT_S = 5.0
"""An attempt with no reply by then counts as unanswered (and fails the test)."""


def fleets(address: BrokerAddress, prefix: str) -> tuple[Fleet, Fleet]:
    runners = Fleet(address, prefix, [f"{prefix}/runners/+/res/+"], name="runners")
    apps = Fleet(address, prefix, [f"{prefix}/apps/+/res/+"], name="apps")
    return runners, apps


def all_replies(fleet: Fleet) -> list[dict[str, object]]:
    return [reply for replies in fleet.replies.values() for reply in replies]


@pytest.mark.parametrize("fault", ["stop", "freeze"])
async def test_redis_outage_under_load(
    fault: str,
    make_redis_server: Callable[..., RedisServer],
    mosquitto_broker: MosquittoBroker,
    service_on: ServiceOn,
    topic_prefix: str,
    rel_prefix: str,
) -> None:
    redis_server = make_redis_server(extra_args=["--appendonly", "yes"])
    running = await service_on(
        mqtt_url=mosquitto_broker.url,
        redis_url=redis_server.url,
        redis_timeout_s=REDIS_TIMEOUT_S,
    )
    keys = KeySchema(rel_prefix)
    address = BrokerAddress(mosquitto_broker.host, mosquitto_broker.port)
    runner_ids = [f"r{i}" for i in range(APPS)]
    app_ids = [f"a{i}" for i in range(APPS)]
    runners, apps = fleets(address, topic_prefix)
    loop = asyncio.get_running_loop()
    async with runners, apps:
        codes = await issue_codes(runners, runner_ids)
        request_ids = {a: f"pair-{a}-{uuid.uuid4().hex[:8]}" for a in app_ids}
        started = loop.time()

        async def pair(i: int) -> Attempted:
            await asyncio.sleep(i * STAGGER_S)
            body = {"request_id": request_ids[app_ids[i]], "code": codes[runner_ids[i]]}
            return await apps.call_with_retries(
                Kind.APP,
                app_ids[i],
                "pair",
                body,
                attempt_timeout_s=ATTEMPT_TIMEOUT_S,
                max_attempts=12,
            )

        tasks = [asyncio.create_task(pair(i)) for i in range(APPS)]
        await asyncio.sleep(OUTAGE_AT_S)
        down_at = loop.time()
        pid = redis_server.process.pid if redis_server.process else 0
        try:
            if fault == "stop":
                await asyncio.to_thread(redis_server.stop)
            else:
                os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(OUTAGE_S)
        finally:
            if fault == "freeze":
                os.kill(pid, signal.SIGCONT)
            else:
                await asyncio.to_thread(redis_server.start)
        up_at = loop.time()
        results = await asyncio.gather(*tasks)
        done_at = loop.time()
        running.assert_serving()

        # Every attempt answered, each within the bound, before, during and after.
        tries = [t for r in results for t in r.tries]
        unanswered = [t for t in tries if t.latency_s is None]
        late = [t for t in tries if t.latency_s is not None and t.latency_s > ANSWER_BOUND_S]
        assert not unanswered, (
            f"{len(unanswered)} of {len(tries)} attempts got no reply within "
            f"{ATTEMPT_TIMEOUT_S} s, sent at (s after the outage began): "
            f"{sorted(round(t.sent_at - down_at, 2) for t in unanswered)}"
        )
        assert not late, (
            f"{len(late)} replies came after more than {ANSWER_BOUND_S} s: "
            f"{sorted((round(t.sent_at - down_at, 2), t.latency_s, t.outcome) for t in late)}"
        )

        # During the outage: SERVICE_UNAVAILABLE with retry_after_s.
        replies = all_replies(apps)
        codes_seen = Counter(
            "ok" if r.get("ok") else r["error"]["code"]  # type: ignore[index]
            for r in replies
        )
        unavailable = [r for r in replies if not r.get("ok")]
        assert codes_seen["SERVICE_UNAVAILABLE"] > 0, codes_seen
        assert set(codes_seen) <= {"ok", "SERVICE_UNAVAILABLE"}, codes_seen
        for reply in unavailable:
            error = reply["error"]
            assert isinstance(error, dict)
            assert isinstance(error["retry_after_s"], int), reply
            assert error["retry_after_s"] >= 1
        latencies = [s for r in results for s in r.unavailable_s]
        during = [t for t in tries if down_at <= t.sent_at < up_at]
        assert during, "no attempt was made during the outage"

        # After: every app paired (same request_id), nothing stuck, nothing doubled.
        not_ok = {app_ids[i]: r for i, r in enumerate(results) if not r.ok}
        assert not not_ok, not_ok
        session_of: dict[str, str] = {}
        for i, result in enumerate(results):
            assert result.reply is not None
            session = result.reply["result"]["session"]
            assert (session["runner_id"], session["app_id"]) == (runner_ids[i], app_ids[i])
            session_of[runner_ids[i]] = session["session_id"]
            oks = {
                json.dumps(r, sort_keys=True)
                for r in apps.all_replies(Kind.APP, app_ids[i], "pair", request_ids[app_ids[i]])
                if r.get("ok")
            }
            assert len(oks) == 1, (app_ids[i], oks)
        client = redis_server.client(decode_responses=True)
        try:
            claims = code_claims(client, rel_prefix)
            assert len(claims) == APPS
            assert all(len(c) == 1 for c in claims.values()), claims
            for i, runner_id in enumerate(runner_ids):
                assert list(runner_sessions(client, keys, runner_id)) == [session_of[runner_id]]
                assert list(app_sessions(client, keys, app_ids[i])) == [session_of[runner_id]]
            # The service still serves normally: a runner lists its session.
            check = await runners.call_with_retries(
                Kind.RUNNER, "r0", "sessions", {"request_id": "after-outage"}
            )
            assert check.ok, check
            assert check.reply is not None
            assert [s["session_id"] for s in check.reply["result"]["sessions"]] == [
                session_of["r0"]
            ]
            without_ttl = keys_without_ttl(client, rel_prefix)
        finally:
            client.close()
        assert without_ttl == [], without_ttl

        recovered = [r for r in results if r.unavailable_s]
        report(
            f"redis {fault} for {OUTAGE_S:.0f} s under load",
            replies=dict(codes_seen),
            unavailable_latency=summary(latencies),
            apps_hit_by_outage=len(recovered),
            attempts=dict(sorted(Counter(r.attempts for r in results).items())),
            timeouts=sum(r.timeouts for r in results),
            all_paired_after_redis_back_s=f"{done_at - up_at:.2f}",
            outage_s=f"{up_at - down_at:.2f}",
            last_pair_elapsed=summary(r.elapsed_s for r in recovered),
            total_s=f"{done_at - started:.2f}",
        )


async def test_script_flush_then_every_op(
    start_service: StartService,
    redis_server: RedisServer,
    peers: Peers,
) -> None:
    running = await start_service()
    client = redis_server.client(decode_responses=True)

    def flush() -> None:
        assert client.script_flush() is True

    try:
        async with peers.runner("r1") as runner, peers.app("a1") as app:
            flush()
            code = (await runner.request_code())["code"]
            flush()
            paired = await app.pair(code)
            session_id = paired["session"]["session_id"]
            flush()
            assert [s["session_id"] for s in await runner.sessions()] == [session_id]
            flush()
            assert [s["session_id"] for s in await app.sessions()] == [session_id]
            flush()
            assert (await app.status())["paired"] is True
            flush()
            assert await app.unpair(session_id) == 1
            flush()
            code2 = (await runner.request_code())["code"]
            flush()
            assert await runner.cancel_code() is True
            flush()
            refused = await app.request("pair", {"code": code2})
            assert refused["error"]["code"] == "CODE_ALREADY_USED"
            flush()
            code3 = (await runner.request_code())["code"]
            await app.pair(code3)
            flush()
            assert await runner.unpair(all=True) == 1
    finally:
        client.close()
    running.assert_serving()
    assert running.service.gateway.counters["internal_error"] == 0


async def test_script_flush_during_concurrent_pairs(
    start_service: StartService,
    redis_server: RedisServer,
    broker_address: BrokerAddress,
    topic_prefix: str,
) -> None:
    """One SCRIPT FLUSH while 150 pairs are in flight: every pair succeeds, first time.

    A first pair loads every script beforehand: a flush while the service is still
    loading them for the first time hits the bug of the xfail test below.
    """
    running = await start_service()
    count = 150
    runners, apps = fleets(broker_address, topic_prefix)
    client = redis_server.client(decode_responses=True)
    try:
        async with runners, apps:
            codes = await issue_codes(runners, ["warm", *(f"r{i}" for i in range(count))])
            warm = await apps.call_with_retries(
                Kind.APP, "warm", "pair", {"request_id": "warm", "code": codes["warm"]}
            )
            assert warm.ok, warm
            tasks = [
                asyncio.create_task(
                    apps.call_with_retries(
                        Kind.APP, f"a{i}", "pair", {"request_id": f"p{i}", "code": codes[f"r{i}"]}
                    )
                )
                for i in range(count)
            ]
            await wait_until(lambda: len(apps.replies) >= 10, 10, "the first replies")
            client.script_flush()
            answered_at_flush = len(apps.replies)
            results = await asyncio.gather(*tasks)
    finally:
        client.close()
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert running.service.gateway.counters["internal_error"] == 0
    report(
        "SCRIPT FLUSH during pairs",
        pairs=count,
        answered_at_flush=answered_at_flush,
        attempts=dict(sorted(Counter(r.attempts for r in results).items())),
        elapsed=summary(r.elapsed_s for r in results),
    )


async def test_noscript_again_while_reloading_is_retried(
    redis_server: RedisServer, rel_prefix: str
) -> None:
    """A flush that lands between SCRIPT LOAD and the EVALSHA that follows it.

    Seen for real with a few SCRIPT FLUSH 50-200 ms apart during 100 concurrent pairs
    (about 1 pair in 10 failed with INTERNAL_ERROR); made deterministic here by flushing
    right after the store's own SCRIPT LOAD.
    """
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    other = redis_server.client()
    store = PairingStore(client, KeySchema(rel_prefix))
    real_load = client.script_load

    async def load_then_flush(script: Any) -> str:
        sha = await real_load(script)
        other.script_flush()  # lands in the window, as a second flush would
        return str(sha)

    try:
        other.script_flush()
        client.script_load = load_then_flush  # type: ignore[method-assign]
        issued = await store.call(store.claim_call("0" * 32, "a1", "p1", "s1"))
        assert issued == ["not_found"]
    finally:
        other.close()
        await client.aclose()
