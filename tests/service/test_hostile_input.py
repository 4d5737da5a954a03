"""End to end: malformed payloads, unknown ops, hostile ids and ops on real Mosquitto.

A malformed payload gets an `INVALID_REQUEST` reply on the default reply topic (with
`request_id` null when the payload cannot be trusted) and the service keeps serving; a
topic with a malformed id or op gets no reply at all, anywhere, and is counted.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mqtt_pairing.payload import MAX_DEPTH, MAX_PAYLOAD_BYTES
from tests.service.support import Peers, RunningService, Sniffer


def nested(depth: int) -> object:
    """A JSON value `depth` levels deep, counting the innermost object as one level."""
    value: object = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def nested_in_request(depth: int, request_id: str, code: str = "abc") -> bytes:
    """A pair request whose object, with the top level, is `depth` levels deep."""
    return json.dumps({"request_id": request_id, "code": code, "x": nested(depth - 1)}).encode()


MARK = "7KQM2X9PZ"
"""A code in the payloads below; no reply may echo it."""

# (case id, payload, the request_id the reply must carry)
MALFORMED = [
    ("not-json", b"this is not json", None),
    ("empty", b"", None),
    ("truncated", b'{"request_id": "t1", "code": ', None),
    ("array", b"[]", None),
    ("string", b'"hello"', None),
    ("number", b"42", None),
    ("null", b"null", None),
    ("code-not-a-string", b'{"request_id": "r", "code": 5, "x": "7KQM2X9PZ"}', "r"),
    ("name-not-a-string", b'{"request_id": "r2", "code": "7KQM2X9PZ", "app_name": 7}', "r2"),
    ("metadata-not-an-object", b'{"request_id": "r3", "code": "7KQM2X9PZ", "metadata": []}', "r3"),
    ("request-id-not-a-string", b'{"request_id": 5, "code": "7KQM2X9PZ"}', None),
    ("request-id-with-space", b'{"request_id": "a b", "code": "7KQM2X9PZ"}', None),
    (
        "request-id-too-long",
        json.dumps({"request_id": "r" * 65, "code": "7KQM2X9PZ"}).encode(),
        None,
    ),
    ("request-id-missing", b'{"code": "7KQM2X9PZ"}', None),
    (
        "too-large",
        json.dumps(
            {"request_id": "big", "code": "7KQM2X9PZ", "pad": "x" * MAX_PAYLOAD_BYTES}
        ).encode(),
        None,
    ),
    ("invalid-utf8", b"\xff\xfe", None),
    ("invalid-utf8-in-object", b'{"request_id": "u", "code": "\xff"}', None),
    ("too-deep", json.dumps(nested(40)).encode(), None),
    ("too-deep-with-request-id", nested_in_request(40, "deep", "7KQM2X9PZ"), "deep"),
    ("deep-array-bomb", b"[" * 4000, None),
    ("nan", b'{"request_id": "n", "code": "7KQM2X9PZ", "x": NaN}', "n"),
    ("lone-surrogate", b'{"request_id": "s", "code": "\\ud800"}', "s"),
    ("duplicate-keys", b'{"request_id": "d", "code": "7KQM2X9PZ", "code": "7KQM2X9PZ"}', None),
]


async def test_malformed_payloads_get_invalid_request(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    reply_topic = f"{peers.prefix}/apps/a1/res/pair"
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        for name, payload, request_id in MALFORMED:
            await app.publish_raw("pair", payload)
            reply = (await sniffer.next(reply_topic)).json()
            assert reply["ok"] is False, name
            assert reply["error"]["code"] == "INVALID_REQUEST", (name, reply)
            assert reply["request_id"] == request_id, (name, reply)
            assert set(reply) == {"request_id", "ok", "error"}, name
            assert MARK not in json.dumps(reply), name
            running_service.assert_serving()
        # Nothing was published anywhere else (a reply per request, no events).
        replies = [m for m in sniffer.under(peers.prefix) if "/req/" not in m.topic]
        assert [m.topic for m in replies] == [reply_topic] * len(MALFORMED)
        # And the service still pairs.
        code = (await runner.request_code())["code"]
        paired = await app.pair(code)
        assert paired["session"]["runner_id"] == "r1"


async def test_depth_limit_is_exactly_32(running_service: RunningService, peers: Peers) -> None:
    async with peers.app("a1") as app:
        at_limit = json.loads(nested_in_request(MAX_DEPTH, "ok-depth"))
        reply = await app.request("pair", at_limit)
        assert reply["error"]["code"] == "INVALID_FORMAT"
        over = json.loads(nested_in_request(MAX_DEPTH + 1, "too-deep"))
        reply = await app.request("pair", over)
        assert reply["error"]["code"] == "INVALID_REQUEST"


async def test_payload_of_exactly_4096_bytes_is_parsed(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    base = {"request_id": "edge", "code": "abc", "pad": ""}
    pad = MAX_PAYLOAD_BYTES - len(json.dumps(base).encode())
    exact = json.dumps({**base, "pad": "p" * pad}).encode()
    assert len(exact) == MAX_PAYLOAD_BYTES
    reply_topic = f"{peers.prefix}/apps/a1/res/pair"
    async with peers.app("a1") as app:
        await app.publish_raw("pair", exact)
        reply = (await sniffer.next(reply_topic)).json()
        assert reply["request_id"] == "edge"
        assert reply["error"]["code"] == "INVALID_FORMAT"
        await app.publish_raw("pair", exact[:-2] + b'p"}')
        reply = (await sniffer.next(reply_topic)).json()
        assert reply["request_id"] is None
        assert reply["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    ("kind", "op"),
    [
        ("apps", "frobnicate"),
        ("apps", "code"),  # a runner op, asked by an app
        ("runners", "pair"),  # an app op, asked by a runner
        ("runners", "status"),
    ],
)
async def test_unknown_op_gets_invalid_request(
    running_service: RunningService, peers: Peers, sniffer: Sniffer, kind: str, op: str
) -> None:
    topic = f"{peers.prefix}/{kind}/x1/req/{op}"
    await sniffer.publish(topic, json.dumps({"request_id": "u1", "code": "abc"}).encode())
    reply = (await sniffer.next(f"{peers.prefix}/{kind}/x1/res/{op}")).json()
    assert reply == {
        "request_id": "u1",
        "ok": False,
        "error": {"code": "INVALID_REQUEST", "message": reply["error"]["message"]},
    }
    running_service.assert_serving()


@pytest.mark.no_contract  # it publishes a request body on a reply topic itself
async def test_hostile_ids_and_ops_get_no_reply(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    p = peers.prefix
    # These reach the service (they match its subscriptions) and must be dropped.
    reaching = [
        f"{p}/apps/-bad/req/pair",
        f"{p}/apps/.hidden/req/pair",
        f"{p}/apps/_x/req/pair",
        f"{p}/apps/{'a' * 65}/req/pair",
        f"{p}/apps/é/req/pair",
        f"{p}/apps/a b/req/pair",
        f"{p}/runners/r1 /req/code",
        f"{p}/apps/a1/req/Pair",
        f"{p}/apps/a1/req/pair_x",
        f"{p}/apps/a1/req/-pair",
        f"{p}/apps/a1/req/pair1",
        f"{p}/apps/a1/req/{'p' * 33}",
        f"{p}/runners/r1/req/CODE",
        f"{p}/apps/a1/req/",  # an empty op level matches `+`
        f"{p}/apps//req/pair",  # and so does an empty id level
    ]
    # These do not even match the service's subscriptions.
    elsewhere = [
        f"{p}/apps/a1/req/pair/extra",
        f"{p}/bogus/a1/req/pair",
        f"{p}/apps/a1/res/pair",
        f"{p}/apps/a1/req",
        f"{p}//a1/req/pair",
        f"{p}x/apps/a1/req/pair",
    ]
    body = json.dumps({"request_id": "h1", "code": "abc"}).encode()
    before = running_service.dropped
    for topic in reaching + elsewhere:
        await sniffer.publish(topic, body)

    deadline = asyncio.get_running_loop().time() + 5
    while running_service.dropped < before + len(reaching):
        assert asyncio.get_running_loop().time() < deadline, (
            running_service.service.gateway.counters
        )
        await asyncio.sleep(0.02)
    assert running_service.service.gateway.dispatcher.counters.total() == 0
    # Whatever the service published before the barrier's reply has arrived by now.
    await sniffer.barrier(prefix=p)

    published = set(reaching + elsewhere)
    stray = [
        m.topic for m in sniffer.under(p) if m.topic not in published and "/barrier-" not in m.topic
    ]
    assert stray == []
    assert running_service.dropped == before + len(reaching)
    assert running_service.service.gateway.dispatcher.counters == {"ok.sessions": 1}
    running_service.assert_serving()

    # The service still answers a good request.
    async with peers.app("a1") as app:
        assert await app.sessions() == []
