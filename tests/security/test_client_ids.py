"""No client of one kind can take the connection of the service or of another client.

Client ids are global across Mosquitto's listeners, and a CONNECT with a connected
client's id closes that client ("already connected, closing old connection"); from
another username it also throws away that client's session and what was queued in it.
On the shipped runner and app listeners a client's id is its username
(`use_username_as_clientid`), and the service's id never looks like one
(docs/security.md, "Client ids"). Each attacker here is an ordinary runner or app that
knows its victim's client id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

import aiomqtt
import pytest

from mqtt_pairing.config import Settings
from tests.harness.servers import RedisServer
from tests.security.attacks import Attacker, attackers_of_every_kind, legit_traffic, peers
from tests.security.harness import SecureBroker, Sniffer, running_service

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

ROUNDS = 2


def closed_connections(broker: SecureBroker, client_id: str) -> int:
    """How often the broker closed `client_id`'s connection for a newcomer with its id."""
    text = broker.log_path.read_text(errors="replace")
    return text.count(f"Client {client_id} already connected, closing old connection")


async def impersonate(broker: SecureBroker, attacker: Attacker, client_id: str) -> None:
    """Connect as `attacker` asking for `client_id`; stay until it is connected."""
    sniffer = attacker.sniffer(broker, client_id=client_id)
    with contextlib.suppress(aiomqtt.MqttError):
        async with sniffer:
            await sniffer.subscribe(["pairing/#"])


async def test_no_runner_or_app_can_take_the_service_connection(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    attackers = attackers_of_every_kind(uid)
    runner_ids, app_ids = [f"r-{uid}"], [f"a-{uid}"]
    broker = make_secure_broker(
        runners=runner_ids + [a.ident for a in attackers if a.kind == "runner"],
        apps=app_ids + [a.ident for a in attackers if a.kind == "app"],
    )
    default_id = Settings().mqtt_client_id  # what an attacker would guess
    with caplog.at_level(logging.WARNING, logger="mqtt_pairing.gateway"):
        async with (
            running_service(
                broker, redis_server.url, key_prefix, mqtt_client_id=default_id
            ) as service,
            peers(broker, runner_ids, app_ids) as (runners, apps),
        ):
            for _ in range(ROUNDS):
                for attacker in attackers:
                    await impersonate(broker, attacker, default_id)
                    # Right after the attack: a service that lost its session would miss these.
                    traffic = await legit_traffic(runners, apps)
                    assert traffic.lost == [], f"after {attacker.label}: {traffic.summary()}"
            assert service.gateway.connected.is_set()
    assert closed_connections(broker, default_id) == 0
    assert [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()] == []


async def test_no_runner_or_app_can_take_another_clients_connection(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    attackers = attackers_of_every_kind(uid)
    runner_ids, app_ids = [f"r-{uid}"], [f"a-{uid}"]
    broker = make_secure_broker(
        runners=runner_ids + [a.ident for a in attackers if a.kind == "runner"],
        apps=app_ids + [a.ident for a in attackers if a.kind == "app"],
    )
    async with (
        running_service(broker, redis_server.url, key_prefix),
        peers(broker, runner_ids, app_ids) as (runners, apps),
    ):
        for victim in [*runner_ids, *app_ids]:
            for attacker in attackers:
                await impersonate(broker, attacker, victim)
                traffic = await legit_traffic(runners, apps)
                assert traffic.lost == [], f"{attacker.label} as {victim}: {traffic.summary()}"
    for victim in [*runner_ids, *app_ids]:
        assert closed_connections(broker, victim) == 0, victim


async def test_an_offline_clients_session_survives_a_client_with_its_id(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    """What the broker queued for an offline runner is still there when it comes back."""
    runner_id, app_id = f"r-{uid}", f"a-{uid}"
    attackers = attackers_of_every_kind(uid)
    broker = make_secure_broker(
        runners=[runner_id] + [a.ident for a in attackers if a.kind == "runner"],
        apps=[app_id] + [a.ident for a in attackers if a.kind == "app"],
    )
    victim = Attacker("runner", runner_id, "runner", v311=False)  # a raw, persistent client
    async with running_service(broker, redis_server.url, key_prefix):
        async with victim.sniffer(broker, persistent=True, client_id=runner_id) as first:
            await first.subscribe([f"pairing/runners/{runner_id}/#"])
            await first.publish(f"pairing/runners/{runner_id}/req/code", b'{"request_id":"c1"}')
            code = json.loads(await next_payload(first, f"pairing/runners/{runner_id}/res/code"))
        async with peers(broker, [], [app_id]) as (_, apps):  # while the runner is away
            assert (await apps[0].request("pair", {"code": code["result"]["code"]}))["ok"]
        for attacker in attackers:
            await impersonate(broker, attacker, runner_id)
        async with victim.sniffer(broker, persistent=True, client_id=runner_id) as again:
            queued = json.loads(await next_payload(again, f"pairing/runners/{runner_id}/events"))
    assert queued["event"] in ("session.opened", "code.used")


async def next_payload(sniffer: Sniffer, topic: str) -> bytes:
    for _ in range(200):  # up to 10 s
        for got, payload in sniffer.received:
            if got == topic:
                return payload
        await asyncio.sleep(0.05)
    raise AssertionError(f"nothing on {topic}")
