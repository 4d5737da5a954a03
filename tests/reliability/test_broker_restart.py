"""Mosquitto restarts, idle and with 200 pair requests in flight (issue 6, first test).

A private Mosquitto with persistence; the service runs in-process with a persistent
session (clean start off, session expiry). 200 runners each get a code, then 200 apps pair
at once while the broker is restarted (graceful stop, or SIGKILL); apps retry with the SAME
request_id on timeout. Every request must end with one effective outcome (every reply to
it the same), each code claimed once, each runner with one session: the app's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
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
    report,
    runner_sessions,
    summary,
    wait_until,
)

PAIRS = 200
DOWN_S = 1.0


def fleets(address: BrokerAddress, prefix: str) -> tuple[Fleet, Fleet]:
    """(runners, apps): runners keep their broker session, so no event is lost to them."""
    runners = Fleet(
        address,
        prefix,
        [f"{prefix}/runners/+/res/+", f"{prefix}/runners/+/events"],
        name="runners",
        persistent=True,
    )
    apps = Fleet(address, prefix, [f"{prefix}/apps/+/res/+"], name="apps")
    return runners, apps


async def restart(broker: MosquittoBroker, how: str, down_s: float = 0.0) -> None:
    """Stop the broker gracefully (its database saved) or SIGKILL it; start it again."""
    await asyncio.to_thread(broker.kill if how == "kill" else broker.stop)
    await asyncio.sleep(down_s)
    await asyncio.to_thread(broker.start)


async def test_idle_restart_then_pair(
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    service_on: ServiceOn,
    topic_prefix: str,
    rel_prefix: str,
) -> None:
    broker = make_mosquitto()
    address = BrokerAddress(broker.host, broker.port)
    running = await service_on(mqtt_url=broker.url, redis_url=redis_server.url)
    connected = running.service.gateway.connected
    runners, apps = fleets(address, topic_prefix)
    async with runners, apps:
        codes = await issue_codes(runners, ["r1"])
        loop = asyncio.get_running_loop()
        started = loop.time()
        await restart(broker, "stop")
        back_s = await wait_until(connected.is_set, 15, "the service to reconnect")
        running.assert_serving()
        body = {"request_id": "idle-1", "code": codes["r1"]}
        got = await apps.call_with_retries(Kind.APP, "a1", "pair", body)
        assert got.ok, got
        assert got.reply is not None
        session_id = got.reply["result"]["session"]["session_id"]
        await wait_until(
            lambda: runners.distinct_events(Kind.RUNNER, "r1", "session.opened"),
            10,
            "session.opened for r1",
        )
        opened = runners.distinct_events(Kind.RUNNER, "r1", "session.opened")
        assert [e["session"]["session_id"] for e in opened.values()] == [session_id]
        report(
            "idle broker restart",
            restart_and_reconnect_s=f"{loop.time() - started:.2f}",
            service_back_after_start_s=f"{back_s:.2f}",
            pair_attempts=got.attempts,
        )


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_restart_with_pairs_in_flight(
    how: str,
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    service_on: ServiceOn,
    topic_prefix: str,
    rel_prefix: str,
) -> None:
    broker = make_mosquitto()
    address = BrokerAddress(broker.host, broker.port)
    running = await service_on(mqtt_url=broker.url, redis_url=redis_server.url)
    gateway = running.service.gateway
    keys = KeySchema(rel_prefix)
    runner_ids = [f"r{i}" for i in range(PAIRS)]
    app_ids = [f"a{i}" for i in range(PAIRS)]
    runners, apps = fleets(address, topic_prefix)
    async with runners, apps:
        codes = await issue_codes(runners, runner_ids)
        request_ids = {a: f"pair-{a}-{uuid.uuid4().hex[:8]}" for a in app_ids}
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def pair(i: int) -> Attempted:
            app_id, runner_id = app_ids[i], runner_ids[i]
            body = {"request_id": request_ids[app_id], "code": codes[runner_id]}
            return await apps.call_with_retries(
                Kind.APP, app_id, "pair", body, attempt_timeout_s=3.0, max_attempts=8
            )

        tasks = [asyncio.create_task(pair(i)) for i in range(PAIRS)]
        # Restart as soon as the first reply is back: the rest are in flight (queued at the
        # broker, in the service, or their replies on the way). The broker stays down for
        # a second, longer than it takes the apps to retry.
        await wait_until(lambda: len(apps.replies) >= 1, 10, "the first reply")
        answered_before = len(apps.replies)
        restart_at = loop.time()
        await restart(broker, how, down_s=DOWN_S)
        broker_back = loop.time()
        await wait_until(gateway.connected.is_set, 15, "the service to reconnect")
        service_back = loop.time()
        results = await asyncio.gather(*tasks)
        done_at = loop.time()
        running.assert_serving()

        # Every request ended, with one effective outcome: every reply to it the same.
        failed = {app_ids[i]: r for i, r in enumerate(results) if not r.ok}
        assert not failed, failed
        session_of: dict[str, str] = {}
        for i, result in enumerate(results):
            app_id = app_ids[i]
            assert result.reply is not None
            seen = apps.all_replies(Kind.APP, app_id, "pair", request_ids[app_id])
            distinct = {json.dumps(r, sort_keys=True) for r in seen}
            assert len(distinct) == 1, (app_id, seen)
            session = result.reply["result"]["session"]
            assert session["runner_id"] == runner_ids[i]
            assert session["app_id"] == app_id
            session_of[runner_ids[i]] = session["session_id"]

        # Redis: each code claimed once, by its app; one session per runner, the app's.
        client = redis_server.client(decode_responses=True)
        try:
            claims = code_claims(client, rel_prefix)
            assert len(claims) == PAIRS
            assert all(len(c) == 1 for c in claims.values()), claims
            claimed = sorted(sid for c in claims.values() for sid in c.values())
            assert claimed == sorted(session_of.values())
            for i, runner_id in enumerate(runner_ids):
                sessions = runner_sessions(client, keys, runner_id)
                assert list(sessions) == [session_of[runner_id]], (runner_id, sessions)
                assert list(app_sessions(client, keys, app_ids[i])) == [session_of[runner_id]]
        finally:
            client.close()

        # Runners keep their broker session: after a graceful restart none misses its
        # session.opened (a SIGKILLed broker may lose what it had not saved yet).
        if how == "stop":
            await wait_until(
                lambda: all(
                    runners.distinct_events(Kind.RUNNER, r, "session.opened") for r in runner_ids
                ),
                20,
                "session.opened for every runner",
                interval_s=0.1,
            )
            for runner_id in runner_ids:
                opened = runners.distinct_events(Kind.RUNNER, runner_id, "session.opened")
                got = [e["session"]["session_id"] for e in opened.values()]
                assert got == [session_of[runner_id]], (runner_id, got)

        attempts = Counter(r.attempts for r in results)
        report(
            f"broker {how} with {PAIRS} pairs in flight",
            answered_before_restart=answered_before,
            broker_down_s=f"{broker_back - restart_at:.2f}",
            service_reconnected_after_broker_s=f"{service_back - broker_back:.2f}",
            all_answered_after_restart_s=f"{done_at - restart_at:.2f}",
            total_s=f"{done_at - started:.2f}",
            attempts=dict(sorted(attempts.items())),
            elapsed=summary(r.elapsed_s for r in results),
            service_publish_failed=gateway.counters["publish_failed"],
            ok_pair_replies_sent=gateway.dispatcher.counters["ok.pair"],
        )
