"""End to end: retries with the same request_id, a shared group of two instances, and
requests published while the service is away (persistent session, QoS 1)."""

from __future__ import annotations

import asyncio
import json
import uuid

from tests.service.support import (
    Peers,
    RunningService,
    Sniffer,
    StartService,
    by_event,
    events,
    no_more_events,
)


async def test_pair_retry_is_idempotent(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    reply_topic = f"{peers.prefix}/apps/a1/res/pair"
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code(max_uses=2))["code"]
        body = json.dumps({"request_id": "same-1", "code": code}).encode()
        # A QoS 1 redelivery or a client retry: the same request twice, back to back.
        await app.publish_raw("pair", body)
        await app.publish_raw("pair", body)
        first = (await sniffer.next(reply_topic)).json()
        second = (await sniffer.next(reply_topic)).json()
        assert first["ok"] is True, first
        assert second == first
        # And once more, later.
        third = await app.request("pair", {"request_id": "same-1", "code": code})
        assert third == first
        # One effect only: one session, one use.
        runner_events = by_event(await events(runner, 2))
        assert runner_events["code.used"][0]["uses_left"] == 1
        await no_more_events(runner)
        assert len(await runner.sessions()) == 1
        # The same request_id with another payload is refused.
        reused = await app.request("pair", {"request_id": "same-1", "code": "000-000-000"})
        assert reused["request_id"] == "same-1"
        assert reused["error"]["code"] == "INVALID_REQUEST"


async def test_code_retry_returns_the_same_code(
    running_service: RunningService, peers: Peers
) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        first = await runner.request("code", {"request_id": "code-1", "ttl_s": 300})
        again = await runner.request("code", {"request_id": "code-1", "ttl_s": 300})
        assert again == first
        # The code is still the live one (the retry did not replace it).
        await app.pair(first["result"]["code"])


async def test_shared_group_answers_each_request_once(
    start_service: StartService, peers: Peers, sniffer: Sniffer
) -> None:
    group = f"g-{uuid.uuid4().hex[:8]}"
    key_prefix = f"e2e-{uuid.uuid4().hex[:12]}"
    one = await start_service(pairing_shared_group=group, pairing_key_prefix=key_prefix)
    two = await start_service(pairing_shared_group=group, pairing_key_prefix=key_prefix)
    reply_topic = f"{peers.prefix}/apps/a1/res/sessions"
    count = 20
    async with peers.app("a1") as app:
        for i in range(count):
            await app.publish_raw("sessions", json.dumps({"request_id": f"s{i}"}).encode())
        replies = [(await sniffer.next(reply_topic)).json()["request_id"] for _ in range(count)]
        assert sorted(replies) == sorted(f"s{i}" for i in range(count))
        await app.sessions()
        assert len(sniffer.on(reply_topic)) == count + 1
    handled = [s.service.gateway.dispatcher.counters["ok.sessions"] for s in (one, two)]
    assert sum(handled) == count + 1
    # Pairing works across the two instances (shared state in Redis).
    async with peers.runner("r1") as runner, peers.app("a2") as a2:
        code = (await runner.request_code())["code"]
        await a2.pair(code)


async def test_requests_sent_while_the_service_is_away_are_answered(
    start_service: StartService, peers: Peers
) -> None:
    client_id = f"svc:{uuid.uuid4().hex[:12]}"
    key_prefix = f"e2e-{uuid.uuid4().hex[:12]}"
    first = await start_service(mqtt_client_id=client_id, pairing_key_prefix=key_prefix)
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code())["code"]
        await first.stop()
        pending = asyncio.ensure_future(app.pair(code))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await start_service(mqtt_client_id=client_id, pairing_key_prefix=key_prefix)
        paired = await asyncio.wait_for(pending, 10)
        assert paired["session"]["runner_id"] == "r1"
        opened = by_event(await events(runner, 2))["session.opened"][0]
        assert opened["session"] == paired["session"]
