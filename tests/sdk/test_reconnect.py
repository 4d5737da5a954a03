"""A runner built on the SDK that is away while an app pairs, and a broker restart.

Both use real reconnects: a TCP proxy that drops the runner's link (no DISCONNECT, as a
dead network does) and a private Mosquitto stopped and started again. The runner's user
code is one task reading `events()`; it must see `session.opened` and nothing else.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sdk import RunnerClient, SessionOpened
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.harness.service import StartService, instance_settings, instances
from tests.sdk.support import EVENT_TIMEOUT_S, SdkPeers, TcpProxy, next_of, sdk_peers


async def collect(runner: RunnerClient, into: list[Any]) -> None:
    """The runner's user code: reads its events, and would die on any error."""
    async for event in runner.events():
        into.append(event)


async def wait_for(
    condition: Callable[[], bool], what: str, timeout_s: float = EVENT_TIMEOUT_S
) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.05)


async def test_runner_away_while_an_app_pairs_gets_session_opened_back(
    start_service: StartService, broker_address: BrokerAddress, sdk: SdkPeers
) -> None:
    await start_service()
    async with TcpProxy(broker_address.host, broker_address.port) as proxy:
        runner = sdk.runner(address=proxy.address, will_delay_s=60, keepalive_s=5)
        async with runner, sdk.app() as app:
            code = await runner.request_code()
            seen: list[Any] = []
            user_code = asyncio.create_task(collect(runner, seen))
            generation = runner.connection.generation

            proxy.cut()  # the runner's network is gone; its status stays `online`
            await wait_for(lambda: not runner.connection.connected.is_set(), "the loss")
            # `pair` waits for the runner's nonce: the reply is in once the app hears of
            # the session, and the runner comes back while `pair` waits.
            pairing = asyncio.create_task(app.pair(code.code))
            await next_of(app, SessionOpened)
            assert seen == []

            proxy.restore()
            await wait_for(
                lambda: any(isinstance(e, SessionOpened) for e in seen), "session.opened"
            )
            assert runner.connection.generation > generation
            opened = next(e for e in seen if isinstance(e, SessionOpened))
            paired = await pairing
            assert opened.session == paired.session
            # The app answered the runner's nonce (in `pair`, or after it if the runner
            # took longer than e2e_timeout_s): both have the same SAS.
            session_id = paired.session.session_id
            await wait_for(lambda: app.sas_for(session_id) is not None, "the app's SAS")
            assert opened.sas == app.sas_for(session_id) is not None
            assert not user_code.done()
            user_code.cancel()


async def test_runner_restarted_within_its_will_delay_gets_session_opened(
    start_service: StartService, broker_address: BrokerAddress, sdk: SdkPeers
) -> None:
    """The runner process dies (its link drops, no DISCONNECT) and a new one takes its id."""
    await start_service()
    ident = sdk.unique("runner")
    async with TcpProxy(broker_address.host, broker_address.port) as proxy, sdk.app() as app:
        first = sdk.runner(ident, address=proxy.address, will_delay_s=60)
        await first.open()
        code = await first.request_code(e2e=False)
        proxy.cut()
        await wait_for(lambda: not first.connection.connected.is_set(), "the crash")
        await first.connection.close()  # gone for good, without a word
        paired = await app.pair(code.code)  # not RUNNER_OFFLINE: the will is delayed
        async with sdk.runner(ident) as second:
            event = await second.next_event(timeout_s=EVENT_TIMEOUT_S)
        assert isinstance(event, SessionOpened)
        assert event.session == paired.session
        assert event.sas is None  # the new process does not have the old key


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_runner_survives_a_broker_restart(
    how: str,
    make_mosquitto: Callable[..., MosquittoBroker],
    redis_server: RedisServer,
    topic_prefix: str,
) -> None:
    broker = make_mosquitto()
    address = BrokerAddress(broker.host, broker.port)
    base = instance_settings(topic_prefix, f"sdk-{uuid.uuid4().hex[:8]}")
    async with (
        instances(base) as start,
        sdk_peers(address, topic_prefix) as sdk,
    ):
        running = await start(mqtt_url=broker.url, redis_url=redis_server.url)
        async with sdk.runner() as runner, sdk.app() as app:
            seen: list[Any] = []
            user_code = asyncio.create_task(collect(runner, seen))
            await runner.request_code()

            await asyncio.to_thread(broker.kill if how == "kill" else broker.stop)
            # A call made while the broker is down completes once it is back.
            asking = asyncio.create_task(runner.request_code(timeout_s=30))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(broker.start)
            code = await asking
            await wait_for(running.service.gateway.connected.is_set, "the service", 20)
            paired = await app.pair(code.code, timeout_s=30)

            await wait_for(
                lambda: any(isinstance(e, SessionOpened) for e in seen), "session.opened"
            )
            opened = next(e for e in seen if isinstance(e, SessionOpened))
            assert opened.session == paired.session
            assert opened.sas == paired.sas is not None
            assert not user_code.done()
            user_code.cancel()
            status = await app.status()
            assert status.runners[0].online is True


async def test_runner_away_longer_than_the_reply_expiry_still_gets_session_opened(
    start_service: StartService, broker_address: BrokerAddress, sdk: SdkPeers
) -> None:
    await start_service(pairing_reply_expiry_s=1)
    async with TcpProxy(broker_address.host, broker_address.port) as proxy:
        runner = sdk.runner(address=proxy.address, will_delay_s=60)
        async with runner, sdk.app() as app:
            code = await runner.request_code()
            proxy.cut()
            await wait_for(lambda: not runner.connection.connected.is_set(), "the loss")
            paired = await app.pair(code.code)
            await asyncio.sleep(2.5)  # the time away is the point here, not a synchronisation
            proxy.restore()
            opened = await runner.next_event(timeout_s=EVENT_TIMEOUT_S)
            assert isinstance(opened, SessionOpened)
            assert opened.session == paired.session
