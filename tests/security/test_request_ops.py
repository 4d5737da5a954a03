"""Only the known ops: made-up op names neither fill the broker nor the metrics.

- On the shipped configuration, runners.acl and apps.acl grant `req/<op>` for the
  kind's ops only (docs/protocol.md "Topics"). A runner or app that publishes retained
  messages on made-up op topics (each name one more retained message at the broker)
  gets them refused: the service account, subscribing afterwards, is replayed none of
  them, only the one on a known op; and a live request on a made-up op never reaches the
  service.
- On a broker without ACLs, replies to made-up ops are counted under one `op="unknown"`
  label, however many names are used: the metrics' label values stay a bounded set.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import aiomqtt
import pytest

from mqtt_pairing import metrics
from mqtt_pairing.topics import APP_OPS, RUNNER_OPS
from tests.harness.servers import MosquittoBroker, RedisServer
from tests.harness.service import StartService
from tests.harness.waiting import wait_until
from tests.security.harness import (
    SERVICE_USER,
    SecureBroker,
    Sniffer,
    app_client,
    runner_client,
    running_service,
)
from tests.security.mosquitto_conf import BROKER_CONFIG

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

MADE_UP = [f"made-up-{c}" for c in "abcdefghijklmnopqrst"] + ["frobnicate", "pairx", "code-"]


async def test_unknown_ops_are_refused_by_the_broker(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    runner_id, app_id = f"r-{uid}", f"a-{uid}"
    broker = make_secure_broker(runners=[runner_id], apps=[app_id])
    base = {"runner": f"pairing/runners/{runner_id}", "app": f"pairing/apps/{app_id}"}
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        runner_client(broker, runner_id) as runner,
        app_client(broker, app_id) as app,
    ):
        for client, kind in ((runner, "runner"), (app, "app")):
            body = json.dumps({"request_id": f"retained-{kind}"}).encode()
            for op in MADE_UP:
                await client.publish(f"{base[kind]}/req/{op}", body, retain=True)
            # A known op, retained: stored (the control that the replay below works).
            await client.publish(f"{base[kind]}/req/sessions", body, retain=True)
            # A live request on a made-up op: it must not reach the service either.
            await client.publish(f"{base[kind]}/req/frobnicate", b'{"request_id":"live"}')
        # Wait for the two known-op replies: everything published before them has been
        # routed by the broker by then.
        await wait_until(
            lambda: (
                any(b'"retained-runner"' in b for _, b in runner.received)
                and any(b'"retained-app"' in b for _, b in app.received)
            ),
            10,
            "the replies to the known ops",
        )
        async with Sniffer(broker.address("service", SERVICE_USER), "svc") as reader:
            await reader.subscribe([f"{base['runner']}/req/+", f"{base['app']}/req/+"])
            await wait_until(lambda: len(reader.received) >= 2, 10, "the retained replay")
            # A sentinel after the replay: once it is in, the replay is complete.
            await runner.publish(f"{base['runner']}/req/heartbeat", b'{"request_id":"end"}')
            await wait_until(lambda: len(reader.received) >= 3, 10, "the sentinel")
        assert sorted(reader.topics()) == sorted(
            [
                f"{base['runner']}/req/sessions",
                f"{base['app']}/req/sessions",
                f"{base['runner']}/req/heartbeat",
            ]
        )
        for client in (runner, app):
            assert not [t for t, _ in client.received if "frobnicate" in t or "made-up" in t]
        counters = service.gateway.dispatcher.counters
        assert counters["error.INVALID_REQUEST"] == 0, dict(counters)
        # Clean up the two stored retained requests (ids are unique to this test anyway).
        await runner.publish(f"{base['runner']}/req/sessions", b"", retain=True)
        await app.publish(f"{base['app']}/req/sessions", b"", retain=True)


async def test_unknown_ops_share_one_metrics_label(
    start_service: StartService, mosquitto_broker: MosquittoBroker, topic_prefix: str
) -> None:
    running = await start_service()
    gateway = running.service.gateway
    async with aiomqtt.Client(
        mosquitto_broker.host,
        mosquitto_broker.port,
        identifier=f"ops-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"{topic_prefix}/+/x1/res/+", qos=1)
        for kind in ("runners", "apps"):
            for op in MADE_UP:
                await client.publish(
                    f"{topic_prefix}/{kind}/x1/req/{op}", b'{"request_id":"u"}', qos=1
                )
        await client.publish(f"{topic_prefix}/apps/x1/req/sessions", b'{"request_id":"k"}', qos=1)

        def counted() -> int:
            return sum(gateway.dispatcher.replies.values())

        await wait_until(lambda: counted() >= 2 * len(MADE_UP) + 1, 20, "every reply counted")
    replies = gateway.dispatcher.replies
    assert replies[("unknown", "INVALID_REQUEST")] == 2 * len(MADE_UP)
    assert {op for op, _ in replies} <= {"unknown"} | RUNNER_OPS | APP_OPS
    text = metrics.render(gateway).decode()
    assert 'op="unknown"' in text
    assert "made-up" not in text
    assert "frobnicate" not in text


@pytest.mark.parametrize(
    ("acl", "kind", "ops"), [("runners.acl", "runners", RUNNER_OPS), ("apps.acl", "apps", APP_OPS)]
)
def test_acl_request_topics_are_the_kinds_ops(acl: str, kind: str, ops: frozenset[str]) -> None:
    """The ACLs and the code name the same ops (topics.RUNNER_OPS, topics.APP_OPS)."""
    head = f"pattern write pairing/{kind}/%u/req/"
    lines = (BROKER_CONFIG / acl).read_text().splitlines()
    granted = {line.removeprefix(head) for line in lines if line.startswith(head)}
    assert granted == ops
