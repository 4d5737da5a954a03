"""Smoke: the pair flow on the embedded broker (amqtt, MQTT 3.1.1) + the in-memory store."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from mqtt_pairing.client import ReplyError
from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import build_service
from tests.harness.servers import free_port
from tests.service.support import Peers, RunningService, by_event, events, start_running

ENV_VARS = (
    "MQTT_URL",
    "MQTT_PROTOCOL",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "REDIS_CLUSTER_URL",
    "PAIRING_SECRET",
    "PAIRING_SHARED_GROUP",
)


@pytest.fixture
async def embedded_service(
    monkeypatch: pytest.MonkeyPatch, topic_prefix: str
) -> AsyncIterator[RunningService]:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    settings = load_settings(
        pairing_topic_prefix=topic_prefix,
        mqtt_client_id=f"svc:{uuid.uuid4().hex[:12]}",
        pairing_shutdown_grace_s=2.0,
    )
    service = await build_service(settings, listen=f"127.0.0.1:{port}")
    assert service.broker is not None
    assert service.memory is not None
    assert service.gateway.protocol == "3.1.1"
    assert service.gateway.share_group == ""
    running = await start_running(service, BrokerAddress("127.0.0.1", port), topic_prefix)
    try:
        yield running
    finally:
        await running.stop()


async def test_pair_flow_on_embedded_broker_and_memory_store(
    embedded_service: RunningService,
) -> None:
    peers = Peers(embedded_service.address, embedded_service.prefix)
    async with (
        peers.runner("r1", protocol="3.1.1") as runner,
        peers.app("a1", protocol="3.1.1") as app,
        peers.app("a2", protocol="3.1.1") as late,
    ):
        result = await runner.request_code(metadata={"host": "ci-7"}, public_key="rk")
        paired = await app.pair(result["code"].lower(), metadata={"m": 1}, public_key="ak")
        session = paired["session"]
        assert session["runner_id"] == "r1"
        assert session["app_id"] == "a1"
        assert paired["runner_metadata"] == {"host": "ci-7"}
        assert paired["runner_public_key"] == "rk"

        runner_events = by_event(await events(runner, 2))
        opened = runner_events["session.opened"][0]
        assert opened["session"] == session
        assert opened["app_metadata"] == {"m": 1}
        assert opened["app_public_key"] == "ak"
        assert runner_events["code.used"][0]["uses_left"] == 0
        (app_opened,) = await events(app, 1)
        assert app_opened["session"] == session

        with pytest.raises(ReplyError) as caught:
            await late.pair(result["code"])
        assert caught.value.code == "CODE_ALREADY_USED"

        assert [s["session_id"] for s in await runner.sessions()] == [session["session_id"]]
        assert await app.unpair(session["session_id"]) == 1
        (closed,) = await events(runner, 1)
        assert closed["event"] == "session.closed"
        assert closed["session"]["closed_reason"] == "unpaired_by_app"
