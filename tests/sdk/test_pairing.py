"""The SDK against the real service and Mosquitto: pairing, SAS on both ends, sessions."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import pytest

from mqtt_pairing.errors import PairingErrorCode
from mqtt_pairing.sas import parse_public_key
from mqtt_pairing.sdk import (
    CodeUsed,
    KeyMismatch,
    ReplyError,
    SessionClosed,
    SessionOpened,
    retry,
)
from mqtt_pairing.sdk.e2e import KeyPair, agree
from tests.sdk.support import SdkPeers, next_of
from tests.service.support import RunningService, Sniffer, StartService


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_both_ends_see_the_same_sas(
    protocol: Literal["5", "3.1.1"], running_service: RunningService, sdk: SdkPeers
) -> None:
    async with (
        sdk.runner(name="Build box", protocol=protocol) as runner,
        sdk.app(name="My phone", protocol=protocol) as app,
    ):
        code = await runner.request_code(ttl_s=120)
        assert code.ttl_s == 120
        assert "&key=" in code.pairing_uri
        paired = await app.pair(code.code.lower())
        assert paired.session.runner_id == runner.id
        assert paired.session.runner_name == "Build box"
        opened = await next_of(runner, SessionOpened)
        assert opened.session == paired.session
        assert opened.session.app_name == "My phone"
        assert paired.sas is not None
        assert opened.sas == paired.sas
        assert opened.session_key == paired.session_key
        assert len(paired.sas.words) == 4
        used = await next_of(runner, CodeUsed)
        assert used.uses_left == 0
        # The app's own copy of the event carries the SAS too.
        assert (await next_of(app, SessionOpened)).sas == paired.sas

        assert [s.session_id for s in await app.sessions()] == [paired.session.session_id]
        assert [s.session_id for s in await runner.sessions()] == [paired.session.session_id]
        status = await app.status()
        assert status.paired
        assert status.runners[0].online is True  # the SDK runner announced itself

        assert await app.unpair(paired.session.session_id) == 1
        closed = await next_of(runner, SessionClosed)
        assert closed.session.closed_reason == "unpaired_by_app"
        assert await runner.sessions() == []


async def test_the_service_sees_only_public_keys(
    running_service: RunningService, sdk: SdkPeers, sniffer: Sniffer
) -> None:
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        paired = await app.pair(code.code)
        opened = await next_of(runner, SessionOpened)
    assert paired.session_key is not None
    assert opened.session_key == paired.session_key
    wire = b"".join(m.payload for m in sniffer.under(sdk.prefix))
    for secret in (paired.session_key, paired.session_key.hex().encode()):
        assert secret not in wire
    # What went through the broker is exactly the two public keys.
    requests = [json.loads(m.payload) for m in sniffer.under(sdk.prefix) if "/req/" in m.topic]
    keys = [r["public_key"] for r in requests if "public_key" in r]
    assert len(keys) == 2
    assert all(parse_public_key(k) for k in keys)


async def test_pairing_uri_names_the_runner_key(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        paired = await app.pair_uri(code.pairing_uri)
        opened = await next_of(runner, SessionOpened)
        assert opened.sas == paired.sas is not None


async def test_a_uri_key_that_does_not_match_closes_the_session(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        forged = code.pairing_uri.rsplit("&key=", 1)[0] + "&key=" + KeyPair.generate().key_id
        with pytest.raises(KeyMismatch):
            await app.pair_uri(forged)
        closed = await next_of(runner, SessionClosed)
        assert closed.session.closed_reason == "unpaired_by_app"
        assert await app.sessions() == []


async def test_a_relay_that_swaps_the_keys_makes_the_sas_differ(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    """A compromised service replaces both public keys with its own in transit."""
    mallory_for_app, mallory_for_runner = KeyPair.generate(), KeyPair.generate()
    dispatcher = running_service.service.gateway.dispatcher
    handle = dispatcher.handle
    seen: dict[str, str] = {}

    async def swapping(identity: Any, op: str, payload: bytes, **kwargs: Any) -> Any:
        body = json.loads(payload)
        if op == "code" and "public_key" in body:
            seen["runner"] = body["public_key"]
            body["public_key"] = mallory_for_app.wire()
        elif op == "pair" and "public_key" in body:
            seen["app"] = body["public_key"]
            body["public_key"] = mallory_for_runner.wire()
        return await handle(identity, op, json.dumps(body).encode(), **kwargs)

    dispatcher.handle = swapping  # type: ignore[method-assign]
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        paired = await app.pair(code.code)
        opened = await next_of(runner, SessionOpened)
    assert paired.sas is not None
    assert opened.sas is not None
    assert paired.sas != opened.sas
    assert paired.sas.digits != opened.sas.digits or paired.sas.words != opened.sas.words
    # Mallory can compute each side's SAS (she holds both shared secrets)...
    session_id = paired.session.session_id
    app_raw = parse_public_key(seen["app"]).raw
    runner_raw = parse_public_key(seen["runner"]).raw
    assert agree(mallory_for_app, app_raw, session_id, own_role="runner").sas == paired.sas
    assert agree(mallory_for_runner, runner_raw, session_id, own_role="app").sas == opened.sas
    # ...but the people comparing the screens see two different strings.


async def test_retry_waits_out_a_rate_limit(start_service: StartService, sdk: SdkPeers) -> None:
    await start_service(pairing_penalty_s=1, pairing_fail_limit=2)
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        for _ in range(2):
            with pytest.raises(ReplyError) as failed:
                await app.pair("000-000-000")
            assert failed.value.code is PairingErrorCode.CODE_NOT_FOUND
        with pytest.raises(ReplyError) as limited:
            await app.pair(code.code)
        assert limited.value.code is PairingErrorCode.RATE_LIMITED
        assert limited.value.retryable
        assert limited.value.retry_after_s == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        paired = await retry(lambda: app.pair(code.code), attempts=3, max_wait_s=5)
        assert loop.time() - started >= 0.9
        assert paired.session.runner_id == runner.id


async def test_retry_gives_up_on_errors_time_cannot_fix(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    async with sdk.app() as app:
        calls = 0

        async def attempt() -> Any:
            nonlocal calls
            calls += 1
            return await app.pair("000-000-000")

        with pytest.raises(ReplyError) as failed:
            await retry(attempt, attempts=5)
        assert failed.value.code is PairingErrorCode.CODE_NOT_FOUND
        assert calls == 1


async def test_duplicate_events_are_dropped(
    running_service: RunningService, sdk: SdkPeers, sniffer: Sniffer
) -> None:
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        await app.pair(code.code)
        opened = await sniffer.next(f"{sdk.prefix}/runners/{runner.id}/events")
        # The broker delivers the same event again (a QoS 1 redelivery, a replay).
        await sniffer.publish(opened.topic, opened.payload)
        first = await next_of(runner, SessionOpened)
        await next_of(runner, CodeUsed)
        with pytest.raises(TimeoutError):
            await runner.next_event(timeout_s=0.5)
        assert first.event_id == json.loads(opened.payload)["event_id"]


async def test_heartbeats_keep_a_runner_online_without_statuses(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    async with sdk.runner(presence=False, heartbeat_s=0.2) as runner, sdk.app() as app:
        code = await runner.request_code()
        await app.pair(code.code)
        async with asyncio.timeout(10):
            while (await app.status()).runners[0].online is not True:
                await asyncio.sleep(0.1)
