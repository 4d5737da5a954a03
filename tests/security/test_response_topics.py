"""Every Response Topic the service accepts is delivered under the shipped ACLs, and only
those: the rule (docs/protocol.md, "MQTT 5 properties"; `topics.accept_response_topic`) is the
requester's `P/<kind>s/<id>/res/#`, which its ACL lets it read and service.acl lets the
service write.

MQTT 5 requests from a runner and from apps (TCP and WebSockets) name Response Topics
at every kind of place: where the rule allows, the reply must arrive there; where it
refuses, on the default `.../res/<op>`, with the Correlation Data either way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.harness.servers import RedisServer
from tests.security.harness import SecureBroker, Sniffer, running_service

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

ALLOWED = ["res", "res/inbox", "res/inbox/7", "res/a/b/c", "res/", "res//x", "res/sessions"]
"""Under the requester's own `res` (relative to `P/<kind>s/<id>/`)."""

REFUSED_OWN = ["inbox", "inbox/1", "events", "status", "status/x", "req/x", "results", ""]
"""In the requester's own subtree, outside `res` (relative to `P/<kind>s/<id>/`)."""

WAIT_S = 10.0


def properties(response_topic: str, correlation: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.ResponseTopic = response_topic
    props.CorrelationData = correlation
    return props


async def reply_on(sniffer: Sniffer, correlation: bytes) -> tuple[str, dict[str, object]]:
    """The topic and body of the reply carrying `request_id` == `correlation`."""
    for _ in range(int(WAIT_S / 0.05)):
        for topic, payload in sniffer.received:
            body = json.loads(payload)
            if body.get("request_id") == correlation.decode():
                return topic, body
        await asyncio.sleep(0.05)
    raise AssertionError(f"no reply to {correlation!r} anywhere the requester can read")


@pytest.mark.parametrize(
    ("kind", "listener"), [("runner", "runner"), ("app", "app"), ("app", "app-ws")]
)
async def test_replies_go_to_allowed_response_topics_and_nowhere_else(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    kind: str,
    listener: str,
) -> None:
    me, other = f"me-{uid}", f"other-{uid}"
    broker = make_secure_broker(**{f"{kind}s": [me, other]})
    base = f"pairing/{kind}s/{me}"
    other_kind = "apps" if kind == "runner" else "runners"
    refused = [f"{base}/{rest}".rstrip("/") for rest in REFUSED_OWN] + [
        f"pairing/{kind}s/{other}/res/x",  # another client of the same kind
        f"pairing/{other_kind}/{me}/res/x",  # the same id, the other kind
        f"pairing/{kind}s/{me}x/res/x",  # an id that merely starts with the requester's
        "pairing/elsewhere/x",
    ]
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        Sniffer(broker.address(kind, me, listener=listener), me, client_id=me) as requester,
        Sniffer(broker.address(kind, other), other, client_id=other) as neighbour,
    ):
        await requester.subscribe([f"{base}/#"])  # all it may read: res/# and events
        await neighbour.subscribe([f"pairing/{kind}s/{other}/#"])
        for n, topic in enumerate(ALLOWED + refused):
            correlation = f"rt-{n}".encode()
            await requester.publish(
                f"{base}/req/sessions",
                json.dumps({"request_id": correlation.decode()}).encode(),
                properties=properties(
                    f"{base}/{topic}" if topic in ALLOWED else topic, correlation
                ),
            )
            got, body = await reply_on(requester, correlation)
            expected = f"{base}/{topic}" if topic in ALLOWED else f"{base}/res/sessions"
            assert (got, body["ok"]) == (expected, True), topic
        counters = service.gateway.counters
        assert counters["response_topic_refused"] == len(refused)
    assert neighbour.received == []
    replies = [topic for topic, _ in requester.received]
    assert len(replies) == len(ALLOWED) + len(refused)  # one copy each, nothing else
