"""SIGKILL between the steps of a pair (issue 6, fourth test), with `serve` as a process.

`MQTT_PAIRING_FAULT_POINT=after_claim` makes the process SIGKILL itself once a use of the
code is claimed (recording a session_id for (app_id, request_id)) and before the session
is opened. Restarted without the fault:

- with the same `MQTT_CLIENT_ID`, the broker redelivers the unacknowledged request (QoS 1,
  persistent session) and the service completes the pairing with the ORIGINAL session_id,
  with no retry from the app;
- with another client id (no redelivery), the app's retry with the same request_id does.

`before_publish_events`: the process dies after the reply, before publishing the events;
the runner still gets `session.opened` (from the outbox) once a service runs again.

SIGTERM with pairs in flight: the process finishes what it took, exits 0, and the next
process answers the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections import Counter

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.topics import Kind
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.reliability.conftest import MakeServe
from tests.reliability.support import (
    Fleet,
    code_claims,
    issue_codes,
    report,
    runner_sessions,
    wait_until,
)
from tests.service.support import Peers, Sniffer, by_event, events

LEASE_S = "2"
"""PAIRING_PENDING_LEASE_S: a copy of a request whose first copy died takes over after it."""


def settings_env(
    mosquitto: MosquittoBroker, redis_server: RedisServer, client_id: str
) -> dict[str, str]:
    return {
        "MQTT_URL": mosquitto.url,
        "REDIS_URL": redis_server.url,
        "MQTT_CLIENT_ID": client_id,
        "PAIRING_PENDING_LEASE_S": LEASE_S,
    }


@pytest.mark.parametrize("completion", ["redelivery", "retry"])
async def test_sigkill_after_claim_completes_with_the_original_session(
    completion: str,
    serve_process: MakeServe,
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    peers: Peers,
    sniffer: Sniffer,
    rel_prefix: str,
) -> None:
    client_id = f"svc:crash-{uuid.uuid4().hex[:8]}"
    env = settings_env(mosquitto_broker, redis_server, client_id)
    first = serve_process(**env, MQTT_PAIRING_FAULT_POINT="after_claim")
    first.start()
    await first.wait_ready()
    keys = KeySchema(rel_prefix)
    reply_topic = f"{peers.prefix}/apps/a1/res/pair"
    db = redis_server.client(decode_responses=True)
    try:
        async with peers.runner("r1") as runner, peers.app("a1") as app:
            code = (await runner.request_code())["code"]
            body = {"request_id": "crash-1", "code": code}
            await app.publish_raw("pair", json.dumps(body).encode())
            assert await first.wait_exit(10) == -9, first.log()  # SIGKILL, at the fault point

            # The claim recorded the session_id; the session itself was never opened.
            (claims,) = code_claims(db, rel_prefix).values()
            assert list(claims) == ["a1\ncrash-1"]
            original = claims["a1\ncrash-1"]
            assert runner_sessions(db, keys, "r1") == {}
            assert sniffer.on(reply_topic) == []

            restart_env = dict(env)
            if completion == "retry":
                restart_env["MQTT_CLIENT_ID"] = f"{client_id}-new"  # nothing redelivered
            second = serve_process(**restart_env)
            second.start()
            ready_s = await second.wait_ready()

            if completion == "redelivery":
                reply = (await sniffer.next(reply_topic, timeout_s=15)).json()
            else:
                reply = await app.request("pair", body, timeout_s=15)
            assert reply["ok"] is True, reply
            assert reply["result"]["session"]["session_id"] == original

            # The runner is told (session.opened, code.used), once.
            runner_events = by_event(await events(runner, 2))
            opened = runner_events["session.opened"]
            assert [e["session"]["session_id"] for e in opened] == [original]

            # Again with the same request_id: the same reply, no second effect.
            again = await app.request("pair", body, timeout_s=10)
            assert again == reply
            assert list(runner_sessions(db, keys, "r1")) == [original]
            claims_after = code_claims(db, rel_prefix)
            assert [dict(c) for c in claims_after.values()] == [{"a1\ncrash-1": original}]
            report(
                f"SIGKILL after claim, completed by {completion}",
                restart_ready_s=f"{ready_s:.2f}",
            )
    finally:
        db.close()


async def test_sigkill_before_publishing_events_loses_no_event(
    serve_process: MakeServe,
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    peers: Peers,
    sniffer: Sniffer,
    rel_prefix: str,
) -> None:
    client_id = f"svc:crash-{uuid.uuid4().hex[:8]}"
    env = settings_env(mosquitto_broker, redis_server, client_id)
    first = serve_process(**env, MQTT_PAIRING_FAULT_POINT="before_publish_events")
    first.start()
    await first.wait_ready()
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code())["code"]
        body = {"request_id": "crash-2", "code": code}
        # The reply goes out before the process dies.
        reply = await app.request("pair", body, timeout_s=10)
        assert reply["ok"] is True, reply
        session_id = reply["result"]["session"]["session_id"]
        assert await first.wait_exit(10) == -9, first.log()
        assert sniffer.on(f"{peers.prefix}/runners/r1/events") == []

        second = serve_process(**env)
        second.start()
        await second.wait_ready()
        runner_events = by_event(await events(runner, 2))
        opened = runner_events["session.opened"]
        assert [e["session"]["session_id"] for e in opened] == [session_id]
        app_opened = [e for e in await events(app, 1) if e["event"] == "session.opened"]
        assert [e["session"]["session_id"] for e in app_opened] == [session_id]
        # The redelivered request (not acknowledged before the crash) is answered the same.
        again = await app.request("pair", body, timeout_s=10)
        assert again == reply


async def test_sigterm_drains_then_a_new_instance_answers_the_rest(
    serve_process: MakeServe,
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    broker_address: BrokerAddress,
    topic_prefix: str,
    rel_prefix: str,
) -> None:
    """SIGTERM with 150 pairs in flight: exit 0 after the drain; nothing is lost.

    Requests the first process had not taken stay with its broker session and go to the
    next process with the same client id; apps retry with the same request_id.
    """
    env = settings_env(mosquitto_broker, redis_server, f"svc:drain-{uuid.uuid4().hex[:8]}")
    first = serve_process(**env)
    first.start()
    await first.wait_ready()
    count = 150
    runners = Fleet(broker_address, topic_prefix, [f"{topic_prefix}/runners/+/res/+"])
    apps = Fleet(broker_address, topic_prefix, [f"{topic_prefix}/apps/+/res/+"])
    loop = asyncio.get_running_loop()
    async with runners, apps:
        codes = await issue_codes(runners, [f"r{i}" for i in range(count)])
        tasks = [
            asyncio.create_task(
                apps.call_with_retries(
                    Kind.APP,
                    f"a{i}",
                    "pair",
                    {"request_id": f"drain-{i}", "code": codes[f"r{i}"]},
                    attempt_timeout_s=5.0,
                    max_attempts=8,
                )
            )
            for i in range(count)
        ]
        await wait_until(lambda: len(apps.replies) >= 10, 20, "the first replies")
        answered_at_term = len(apps.replies)
        term_at = loop.time()
        os.kill(first.pid, signal.SIGTERM)
        assert await first.wait_exit(15) == 0, first.log()
        drained_s = loop.time() - term_at
        assert "Traceback" not in first.log(200)
        second = serve_process(**env)
        second.start()
        await second.wait_ready()
        results = await asyncio.gather(*tasks)
        done_s = loop.time() - term_at

    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    db = redis_server.client(decode_responses=True)
    try:
        claims = code_claims(db, rel_prefix)
        assert len(claims) == count
        assert all(len(c) == 1 for c in claims.values())
        keys = KeySchema(rel_prefix)
        for i, result in enumerate(results):
            assert result.reply is not None
            session_id = result.reply["result"]["session"]["session_id"]
            assert list(runner_sessions(db, keys, f"r{i}")) == [session_id]
    finally:
        db.close()
    report(
        "SIGTERM with pairs in flight, then a new instance",
        answered_at_term=answered_at_term,
        drain_and_exit_s=f"{drained_s:.2f}",
        all_answered_after_term_s=f"{done_s:.2f}",
        attempts=dict(sorted(Counter(r.attempts for r in results).items())),
    )
