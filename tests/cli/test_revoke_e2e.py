"""A CLI revoke reaches both parties over real Mosquitto (and survives a service restart)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mqtt_pairing.client import AppClient, PairingClient, RunnerClient
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import Service
from tests.cli.support import json_lines, run_cli
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.harness.service import instance_settings, instances

EVENT_TIMEOUT_S = 5.0

Start = Callable[[], "contextlib.AbstractAsyncContextManager[Service]"]


@pytest.fixture
def address(mosquitto_broker: MosquittoBroker) -> BrokerAddress:
    return BrokerAddress(mosquitto_broker.host, mosquitto_broker.port)


@pytest.fixture
def service_env(
    clean_env: None,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    prefix: str,
) -> None:
    """What the operator's shell has: the service's Redis and key prefix."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("PAIRING_KEY_PREFIX", prefix)


@pytest.fixture
def serving(
    service_env: None,
    mosquitto_broker: MosquittoBroker,
    redis_server: RedisServer,
    topic_prefix: str,
    prefix: str,
) -> Start:
    """`async with serving():` runs the service in-process until the block ends."""

    @contextlib.asynccontextmanager
    async def start() -> AsyncIterator[Service]:
        base = instance_settings(
            topic_prefix,
            prefix,
            mqtt_url=mosquitto_broker.url,
            redis_url=redis_server.url,
            pairing_shutdown_grace_s=1.0,
        )
        async with instances(base) as start_one:
            yield (await start_one()).service

    return start


async def next_of(client: PairingClient, name: str) -> dict[str, Any]:
    """The next event called `name`, skipping others (session.opened, code.used, ...)."""
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while True:
            event = await client.next_event(EVENT_TIMEOUT_S)
            if event["event"] == name:
                return event


async def pair(runner: RunnerClient, app: AppClient) -> str:
    code = (await runner.request_code())["code"]
    session_id: str = (await app.pair(code))["session"]["session_id"]
    await next_of(runner, "session.opened")
    await next_of(app, "session.opened")
    return session_id


async def both_hear_revoked(runner: RunnerClient, app: AppClient, session_id: str) -> None:
    """Wait (`EVENT_TIMEOUT_S` at most) for session.closed on both sides.

    The running service delivers what the CLI left in the outbox at its next sweep
    (`PAIRING_SWEEP_INTERVAL_S`, 0.5 s by default): the bound is ten sweeps, a bound on
    delivery by the running service, not a latency figure.
    """
    closed = await asyncio.gather(next_of(runner, "session.closed"), next_of(app, "session.closed"))
    for event in closed:
        assert event["session"]["session_id"] == session_id
        assert event["session"]["state"] == "closed"
        assert event["session"]["closed_reason"] == "revoked"


async def test_cli_revoke_reaches_both_parties_through_the_running_service(
    serving: Start, address: BrokerAddress, topic_prefix: str
) -> None:
    async with (
        serving(),
        RunnerClient("r1", address, prefix=topic_prefix) as runner,
        AppClient("a1", address, prefix=topic_prefix) as app,
    ):
        session_id = await pair(runner, app)
        listed = await asyncio.to_thread(run_cli, "sessions", "list", "--runner", "r1", "--json")
        assert [s["session_id"] for s in json_lines(listed)] == [session_id]

        result = await asyncio.to_thread(run_cli, "sessions", "revoke", session_id)
        assert result.exit_code == 0, result.output
        await both_hear_revoked(runner, app, session_id)
        assert await app.sessions() == []

        # All of a runner's sessions.
        second = await pair(runner, app)
        result = await asyncio.to_thread(run_cli, "sessions", "revoke", "--runner", "r1")
        assert result.exit_code == 0, result.output
        assert "revoked 1 session" in result.stdout
        await both_hear_revoked(runner, app, second)
        assert await runner.sessions() == []


async def test_revoke_while_no_service_runs_is_delivered_when_one_starts(
    serving: Start, address: BrokerAddress, topic_prefix: str
) -> None:
    async with (
        RunnerClient("r1", address, prefix=topic_prefix) as runner,
        AppClient("a1", address, prefix=topic_prefix) as app,
    ):
        async with serving():
            session_id = await pair(runner, app)
        # The service is gone: the revoke waits in the runner's outbox.
        result = await asyncio.to_thread(run_cli, "sessions", "revoke", session_id)
        assert result.exit_code == 0, result.output
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(next_of(app, "session.closed"), 0.7)
        async with serving():
            await both_hear_revoked(runner, app, session_id)
