"""The service's request stream cannot be joined, drained or blocked by a runner or app.

Mosquitto accepts a `$share/<group>/<filter>` subscription from any client, gives it its
turn of the group's messages, and only then applies the ACL, which drops them: a member
of the service's group silently eats requests. The service's group is therefore a
secret derived from `PAIRING_SECRET` (docs/security.md, "The service's request stream");
any group an attacker names is its own, which gets its own copies, dropped by the ACL,
and never takes one of ours.

Attackers of every kind (runner, app over TCP and WebSockets; MQTT 5 and 3.1.1; live, or
with an offline persistent session that the broker keeps serving) subscribe to the
service's filters with the old public group name and others, while legitimate runners
and apps pair. Every legitimate request must be answered, and no attacker may receive
anything but the replies to its own requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable

import pytest

from mqtt_pairing.config import LEGACY_SHARED_GROUP
from mqtt_pairing.topics import Kind, TopicScheme
from tests.harness.servers import RedisServer
from tests.security.attacks import Attacker, attackers_of_every_kind, legit_traffic, peers
from tests.security.harness import SERVICE_USER, SecureBroker, Sniffer, running_service

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

PAIRS = 4
GROUPS = [LEGACY_SHARED_GROUP, "mqtt-pairing-1", "attacker", "g", "+"]
"""The public default of earlier versions, and names an attacker might try (`+` is a
group named `+` to Mosquitto, not a wildcard over groups)."""


def hijack_filters() -> list[str]:
    """Every subscription that would put a client beside the service in a group."""
    filters = []
    for group in GROUPS:  # written out: TopicScheme refuses a group named `+`
        filters += [f"$share/{group}/pairing/{kind.segment}/+/req/+" for kind in Kind]
        filters += [
            f"$share/{group}/pairing/+/+/req/+",
            f"$share/{group}/pairing/#",
            f"$share/{group}/#",
        ]
    return [*filters, "pairing/runners/+/req/+", "pairing/apps/+/req/+"]


async def ask_own_sessions(attacker: Attacker, sniffer: Sniffer) -> None:
    """The attacker's own request and reply: it is a working client, and everything the
    broker had for it before this reply has been delivered once the reply is in."""
    base = f"pairing/{attacker.kind}s/{attacker.ident}"
    await sniffer.subscribe([f"{base}/res/+"])
    request_id = f"own-{attacker.ident}"
    await sniffer.publish(f"{base}/req/sessions", json.dumps({"request_id": request_id}).encode())
    for _ in range(200):  # up to 10 s
        if any(request_id.encode() in payload for _, payload in sniffer.received):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{attacker.label}: no reply to its own request")


def assert_only_its_own_replies(attacker: Attacker, sniffer: Sniffer) -> None:
    own = f"pairing/{attacker.kind}s/{attacker.ident}/res/"
    strays = [topic for topic, _ in sniffer.received if not topic.startswith(own)]
    assert strays == [], f"{attacker.label} received {strays}"
    for _, payload in sniffer.received:
        assert f"own-{attacker.ident}".encode() in payload, (attacker.label, payload)


@pytest.mark.parametrize("offline", [False, True], ids=["live", "offline-session"])
async def test_no_runner_or_app_can_take_requests_from_the_service_group(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    offline: bool,
) -> None:
    attackers = attackers_of_every_kind(uid)
    runner_ids = [f"r{n}-{uid}" for n in range(PAIRS)]
    app_ids = [f"a{n}-{uid}" for n in range(PAIRS)]
    broker = make_secure_broker(
        runners=runner_ids + [a.ident for a in attackers if a.kind == "runner"],
        apps=app_ids + [a.ident for a in attackers if a.kind == "app"],
    )
    async with running_service(broker, redis_server.url, key_prefix) as service:
        async with contextlib.AsyncExitStack() as stack:
            sniffers = {}
            for attacker in attackers:
                sniffer = attacker.sniffer(broker, persistent=offline)
                await stack.enter_async_context(sniffer)
                await sniffer.subscribe(hijack_filters())
                sniffers[attacker] = sniffer
            if offline:
                await stack.aclose()  # their sessions stay, subscribed, and are served
            async with peers(broker, runner_ids, app_ids) as (runners, apps):
                traffic = await legit_traffic(runners, apps)
            assert traffic.lost == [], traffic.summary()
            assert traffic.sent == 5 * PAIRS
            if offline:
                for attacker in attackers:
                    sniffers[attacker] = attacker.sniffer(broker, persistent=True)
                    await stack.enter_async_context(sniffers[attacker])
            for attacker, sniffer in sniffers.items():
                await ask_own_sessions(attacker, sniffer)
                assert_only_its_own_replies(attacker, sniffer)
        assert service.gateway.share_group not in GROUPS  # the default: derived, secret


async def test_a_session_resumed_from_the_public_group_leaves_it(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    """An instance upgraded within its session expiry resumes a broker session that still
    holds `$share/mqtt-pairing/...`; it leaves that group, so an attacker who joins it
    takes nothing and no request is handled twice."""
    attacker = Attacker("app", f"evil-{uid}", "app", v311=False)
    runner_ids, app_ids = [f"r-{uid}"], [f"a-{uid}"]
    broker = make_secure_broker(runners=runner_ids, apps=[*app_ids, attacker.ident])
    client_id = f"svc:upgraded-{uid}"
    scheme = TopicScheme("pairing")
    old = Sniffer(
        broker.address("service", SERVICE_USER), "old", persistent=True, client_id=client_id
    )
    async with old:
        await old.subscribe([scheme.request_filter(kind, LEGACY_SHARED_GROUP) for kind in Kind])
    async with (
        running_service(broker, redis_server.url, key_prefix, mqtt_client_id=client_id) as svc,
        attacker.sniffer(broker) as thief,
    ):
        await thief.subscribe([scheme.request_filter(kind, LEGACY_SHARED_GROUP) for kind in Kind])
        async with peers(broker, runner_ids, app_ids) as (runners, apps):
            traffic = await legit_traffic(runners, apps)
            assert traffic.lost == [], traffic.summary()
            await ask_own_sessions(attacker, thief)
        assert_only_its_own_replies(attacker, thief)
        handled = svc.gateway.dispatcher.counters
        # One of each: no copy came in through the old group.
        assert handled["ok.code"] == 1
        assert handled["ok.pair"] == 1
        assert handled["ok.sessions"] == 3  # runner, app, and the attacker's own
        assert handled["ok.status"] == 1
