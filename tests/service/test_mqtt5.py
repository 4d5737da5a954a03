"""End to end: MQTT 5 Response Topic and Correlation Data, and Message Expiry on replies."""

from __future__ import annotations

import json

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.service.support import Peers, RunningService, Sniffer

CORRELATION = b"\x01\x02"


def request_properties(response_topic: str | None, correlation: bytes | None) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


async def test_own_response_topic_is_honoured(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    p = peers.prefix
    inbox = f"{p}/apps/a1/res/inbox/x"
    await sniffer.publish(
        f"{p}/apps/a1/req/sessions",
        b'{"request_id": "s1"}',
        properties=request_properties(inbox, CORRELATION),
    )
    reply = await sniffer.next(inbox)
    assert reply.json() == {"request_id": "s1", "ok": True, "result": {"sessions": []}}
    assert reply.correlation == CORRELATION
    assert reply.expiry is not None
    assert 590 <= reply.expiry <= 600
    # Nothing on the default reply topic.
    assert sniffer.on(f"{p}/apps/a1/res/sessions") == []


async def test_error_reply_and_null_request_id_follow_the_response_topic(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    p = peers.prefix
    inbox = f"{p}/apps/a1/res/replies"
    await sniffer.publish(
        f"{p}/apps/a1/req/pair", b"not json", properties=request_properties(inbox, b"c-1")
    )
    reply = await sniffer.next(inbox)
    assert reply.json()["request_id"] is None
    assert reply.json()["error"]["code"] == "INVALID_REQUEST"
    assert reply.correlation == b"c-1"
    await sniffer.publish(
        f"{p}/apps/a1/req/pair",
        b'{"request_id": "p1", "code": "000-000-000"}',
        properties=request_properties(inbox, b"c-2"),
    )
    reply = await sniffer.next(inbox)
    assert reply.json()["error"]["code"] == "CODE_NOT_FOUND"
    assert reply.correlation == b"c-2"


async def test_code_reply_expires_with_the_code(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    p = peers.prefix
    inbox = f"{p}/runners/r1/res/codes"
    await sniffer.publish(
        f"{p}/runners/r1/req/code",
        b'{"request_id": "c1", "ttl_s": 120}',
        properties=request_properties(inbox, CORRELATION),
    )
    reply = await sniffer.next(inbox)
    assert reply.json()["result"]["ttl_s"] == 120
    assert reply.correlation == CORRELATION
    assert reply.expiry is not None
    assert 110 <= reply.expiry <= 120


async def test_reply_without_properties_has_expiry_only(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    p = peers.prefix
    await sniffer.publish(f"{p}/apps/a1/req/sessions", b'{"request_id": "s2"}')
    reply = await sniffer.next(f"{p}/apps/a1/res/sessions")
    assert reply.json()["ok"] is True
    assert reply.correlation is None
    assert reply.expiry is not None
    assert 590 <= reply.expiry <= 600


@pytest.mark.parametrize(
    "foreign",
    [
        "{p}/apps/other/res/x",  # another app's subtree
        "{p}/apps/a1/req/pair",  # its own request topic: the reply would loop back in
        "{p}/apps/a1/req",
        "{p}/apps/a1",  # the subtree root itself
        "{p}/apps/a1/inbox/x",  # its own subtree, outside res/ (its ACL drops it)
        "{p}/apps/a1/events",
        "{p}/apps/a1x/res/x",  # an id that merely starts with the requester's
        "{p}/runners/a1/res/x",  # the same id, the other kind
        "{p}x/apps/a1/res/x",  # a prefix that merely starts with the service's
        "{p}-elsewhere/x",
        "elsewhere/x",
        "{p}/apps/a1/#",  # wildcards
        "{p}/apps/a1/+/x",
    ],
)
async def test_foreign_response_topic_is_ignored(
    running_service: RunningService, peers: Peers, sniffer: Sniffer, foreign: str
) -> None:
    p = peers.prefix
    foreign = foreign.format(p=p)
    request_topic = f"{p}/apps/a1/req/pair"
    body = json.dumps({"request_id": "f1", "code": "abc"}).encode()
    await sniffer.publish(request_topic, body, properties=request_properties(foreign, CORRELATION))
    reply = await sniffer.next(f"{p}/apps/a1/res/pair")
    assert reply.json()["request_id"] == "f1"
    assert reply.json()["error"]["code"] == "INVALID_FORMAT"
    assert reply.correlation == CORRELATION
    assert reply.expiry is not None
    # Give a stray copy time to arrive, then check the foreign topic got nothing but
    # (when it is the request topic itself) the request published above.
    async with peers.app("a1") as app:
        await app.sessions()
    on_foreign = sniffer.on(foreign)
    if foreign == request_topic:
        assert [m.payload for m in on_foreign] == [body]
    else:
        assert on_foreign == []
    assert running_service.service.gateway.counters["response_topic_refused"] == 1


async def test_runner_response_topic_rules(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    p = peers.prefix
    for topic, accepted in [
        (f"{p}/runners/r1/status", False),  # its presence topic
        (f"{p}/runners/r1/req/x", False),
        (f"{p}/runners/r1/status/x", False),  # outside res/ (docs/protocol.md)
        (f"{p}/runners/r1/inbox", False),
        (f"{p}/runners/r1/res", True),
        (f"{p}/runners/r1/res/inbox/1", True),
    ]:
        await sniffer.publish(
            f"{p}/runners/r1/req/sessions",
            b'{"request_id": "rs"}',
            properties=request_properties(topic, topic.encode()),
        )
        reply_topic = topic if accepted else f"{p}/runners/r1/res/sessions"
        reply = await sniffer.next(reply_topic)
        assert reply.json()["ok"] is True
        assert reply.correlation == topic.encode()
    assert sniffer.on(f"{p}/runners/r1/status") == []
    assert sniffer.on(f"{p}/runners/r1/req/x") == []
