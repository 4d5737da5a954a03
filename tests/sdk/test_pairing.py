"""The SDK against the real service and Mosquitto: pairing, SAS on both ends, sessions."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import pytest

from mqtt_pairing.errors import PairingErrorCode
from mqtt_pairing.sas import commitment, parse_commitment, parse_public_key
from mqtt_pairing.sdk import (
    CodeUsed,
    E2eFailed,
    KeyMismatch,
    ReplyError,
    SessionClosed,
    SessionOpened,
    retry,
)
from mqtt_pairing.sdk.e2e import (
    KeyPair,
    agree,
    new_nonce,
    read_nonce,
    read_reveal,
    reveal_data,
)
from tests.harness.recorder import Recorder as Sniffer
from tests.harness.service import RunningService, StartService
from tests.sdk.support import SdkPeers, next_of


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
        assert paired.e2e == opened.e2e == "ready"
        assert paired.verified
        assert opened.verified
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
    # What went through the broker: the runner's public key, the app's commitment, the
    # runner's nonce and the app's reveal (its public key and nonce), nothing secret.
    requests = {
        m.topic.rsplit("/", 1)[1] + "/" + m.topic.split("/")[-4][:-1]: json.loads(m.payload)
        for m in sniffer.under(sdk.prefix)
        if "/req/" in m.topic
    }
    runner_key = parse_public_key(requests["code/runner"]["public_key"]).raw
    committed = parse_commitment(requests["pair/app"]["public_key"])
    assert read_nonce(requests["message/runner"]["data"])
    app_key, app_nonce = read_reveal(requests["message/app"]["data"])
    assert committed.digest == commitment(app_key, app_nonce)
    assert runner_key != app_key


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


class Mallory:
    """A compromised service: it rewrites requests before the dispatcher sees them.

    She gives the app her key instead of the runner's (in `code`), the runner her own
    commitment instead of the app's (in `pair`), passes the runner's nonce on, and replaces
    the app's reveal with one of her own: `reveal` says which key and nonce.
    """

    def __init__(self, running_service: RunningService) -> None:
        self.for_app, self.for_runner = KeyPair.generate(), KeyPair.generate()
        self.nonce = new_nonce()
        self.seen: dict[str, Any] = {}
        self.reveal = reveal_data(self.for_runner, self.nonce)
        dispatcher = running_service.service.gateway.dispatcher
        self.handle = dispatcher.handle
        dispatcher.handle = self.rewrite  # type: ignore[method-assign]

    async def rewrite(self, identity: Any, op: str, payload: bytes, **kwargs: Any) -> Any:
        body = json.loads(payload)
        if op == "code" and "public_key" in body:
            self.seen["runner"] = body["public_key"]
            body["public_key"] = self.for_app.wire()
        elif op == "pair" and "public_key" in body:
            self.seen["app"] = body["public_key"]
            body["public_key"] = self.for_runner.commit(self.nonce)
        elif op == "message" and body["data"].get("type") == "sas.nonce":
            self.seen["runner_nonce"] = read_nonce(body["data"])
        elif op == "message" and body["data"].get("type") == "sas.reveal":
            self.seen["reveal"] = body["data"]
            body["data"] = self.reveal
        return await self.handle(identity, op, json.dumps(body).encode(), **kwargs)


async def test_a_relay_that_swaps_the_keys_makes_the_sas_differ(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    """A compromised service replaces both public keys with its own in transit."""
    mallory = Mallory(running_service)
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
    app_raw, app_nonce = read_reveal(mallory.seen["reveal"])
    runner_raw = parse_public_key(mallory.seen["runner"]).raw
    nonces = {"runner_nonce": mallory.seen["runner_nonce"]}
    at_app = agree(
        mallory.for_app, app_raw, session_id, own_role="runner", app_nonce=app_nonce, **nonces
    )
    at_runner = agree(
        mallory.for_runner,
        runner_raw,
        session_id,
        own_role="app",
        app_nonce=mallory.nonce,
        **nonces,
    )
    assert at_app.sas == paired.sas
    assert at_runner.sas == opened.sas
    # ...but the people comparing the screens see two different strings.


async def test_a_relay_cannot_choose_its_key_after_the_runners_nonce(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    """Mallory committed to one key in `pair`; once she has seen N_R she would like to
    reveal another (one she searched for, whose SAS matches the app's). The runner checks
    the reveal against the commitment: no SAS, and it closes the session."""
    mallory = Mallory(running_service)
    chosen_later = KeyPair.generate()
    mallory.reveal = reveal_data(chosen_later, mallory.nonce)
    async with sdk.runner() as runner, sdk.app() as app:
        code = await runner.request_code()
        paired = await app.pair(code.code)
        opened = await next_of(runner, SessionOpened)
        assert opened.e2e == "failed"
        assert not opened.verified
        assert opened.sas is None
        assert opened.session_key is None
        closed = await next_of(runner, SessionClosed)
        assert closed.session.session_id == paired.session.session_id
        assert closed.session.closed_reason == "unpaired_by_runner"
        assert await runner.sessions() == []
    # The app computed a SAS, but the runner shows none to compare it with.
    assert paired.sas is not None
    # The same with the committed key but another nonce.
    mallory.reveal = reveal_data(mallory.for_runner, new_nonce())
    async with sdk.runner() as runner, sdk.app() as app:
        await app.pair((await runner.request_code()).code)
        assert (await next_of(runner, SessionOpened)).e2e == "failed"


async def test_require_e2e_refuses_a_peer_that_does_not_take_part(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    async with sdk.runner(require_e2e=True) as runner, sdk.app() as app:
        # An app without the exchange: the runner closes the session.
        paired = await app.pair((await runner.request_code()).code, e2e=False)
        assert paired.e2e == "none"
        assert paired.sas is None
        opened = await next_of(runner, SessionOpened)
        assert opened.e2e == "failed"
        closed = await next_of(runner, SessionClosed)
        assert closed.session.closed_reason == "unpaired_by_runner"
    async with (
        sdk.runner() as runner,
        sdk.app(require_e2e=True, e2e_timeout_s=1.0) as app,
    ):
        # A runner that sent no key: the app closes the session and raises.
        code = await runner.request_code(e2e=False)
        with pytest.raises(E2eFailed) as failed:
            await app.pair(code.code)
        closed = await next_of(runner, SessionClosed)
        assert closed.session.session_id == failed.value.session_id
        assert closed.session.closed_reason == "unpaired_by_app"
    async with sdk.runner() as runner, sdk.app(e2e_timeout_s=1.0) as app:
        # Without require_e2e: an unverified pairing, said so.
        paired = await app.pair((await runner.request_code(e2e=False)).code)
        assert paired.e2e == "none"
        assert not paired.verified
        opened = await next_of(runner, SessionOpened)
        assert opened.e2e == "none"
        assert opened.sas is None


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


@pytest.mark.parametrize("require_e2e", [False, True])
async def test_a_low_order_runner_key_closes_the_session(
    require_e2e: bool, running_service: RunningService, sdk: SdkPeers
) -> None:
    """A relay gives the app a low-order "runner key" (the shared secret would be all
    zeros): no SAS, and the app closes the session, with or without `require_e2e`."""
    dispatcher = running_service.service.gateway.dispatcher
    handle = dispatcher.handle

    async def rewrite(identity: Any, op: str, payload: bytes, **kwargs: Any) -> Any:
        body = json.loads(payload)
        if op == "code" and "public_key" in body:
            body["public_key"] = "x25519:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # u = 1
        return await handle(identity, op, json.dumps(body).encode(), **kwargs)

    dispatcher.handle = rewrite  # type: ignore[method-assign]
    async with sdk.runner() as runner, sdk.app(require_e2e=require_e2e) as app:
        code = await runner.request_code()
        if require_e2e:
            with pytest.raises(E2eFailed) as failed:
                await app.pair(code.code)
            session_id = failed.value.session_id
        else:
            paired = await app.pair(code.code)
            assert paired.e2e == "failed"
            assert paired.sas is None
            session_id = paired.session.session_id
        closed = await next_of(runner, SessionClosed)
        assert closed.session.session_id == session_id
        assert closed.session.closed_reason == "unpaired_by_app"
        assert await app.sessions() == []
