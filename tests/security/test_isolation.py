"""Topic isolation by broker-config/ ACLs: who can read and write what, checked by delivery.

Mosquitto grants a forbidden SUBSCRIBE and then never delivers, and acknowledges a
forbidden PUBLISH and then drops it, so the tests look at what each connection received
and at what reached the service, never at SUBACK or PUBACK codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable

import pytest

from tests.harness.servers import RedisServer
from tests.security.harness import (
    SERVICE_USER,
    RecordingApp,
    RecordingRunner,
    SecureBroker,
    Sniffer,
    app_client,
    runner_client,
    running_service,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

FORGED_MARK = "forged-by-test"
SETTLE_S = 0.4
"""Time for a delivery that should not happen to show up after a round trip proved the
broker and the service have processed everything sent before it."""


def forged(request_id: str = "forged-1") -> bytes:
    """A well-formed request body that would have an effect if it reached the service."""
    return json.dumps(
        {
            "request_id": request_id,
            "code": "7KQ-M2X-9PZ",
            "session_id": "00000000-0000-4000-8000-000000000000",
            "all": True,
            "state": "offline",
            "event": "session.opened",
            "note": FORGED_MARK,
        }
    ).encode()


def snoop_filters(ids: dict[str, str]) -> list[str]:
    """Everything a curious client might subscribe to."""
    filters = [
        "#",
        "pairing/#",
        "pairing/+/+/#",
        "pairing/runners/+/res/+",
        "pairing/apps/+/res/+",
        "pairing/runners/+/req/+",
        "pairing/apps/+/req/+",
        "pairing/runners/+/events",
        "pairing/apps/+/events",
        "pairing/runners/+/status",
        "$SYS/#",
        "$SYS/broker/uptime",
    ]
    for label, ident in ids.items():
        segment = "runners" if label in "AB" else "apps"
        filters.append(f"pairing/{segment}/{ident}/#")
    return filters


async def test_isolation_matrix(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    ids = {"A": f"ra-{uid}", "B": f"rb-{uid}", "C": f"ac-{uid}", "D": f"ad-{uid}"}
    a, b, c, d = ids["A"], ids["B"], ids["C"], ids["D"]
    broker: SecureBroker = make_secure_broker(runners=[a, b], apps=[c, d])
    # D uses the WebSockets listener: it must be as closed as the TCP one.
    who = {
        "A": broker.address("runner", a),
        "B": broker.address("runner", b),
        "C": broker.address("app", c),
        "D": broker.address("app", d, listener="app-ws"),
        "S": broker.address("service", SERVICE_USER),
    }
    forbidden = {
        "A": [
            f"pairing/runners/{b}/req/code",
            f"pairing/runners/{b}/status",
            f"pairing/apps/{a}/req/pair",  # its own name, but as an app
            f"pairing/runners/{a}/res/code",  # replies come from the service only
            f"pairing/apps/{c}/events",
            f"pairing/runners/{a}/req/code/extra",
        ],
        "B": [
            f"pairing/runners/{a}/req/code",
            f"pairing/runners/{a}/req/cancel-code",
            f"pairing/runners/{a}/req/unpair",
            f"pairing/runners/{a}/status",
            f"pairing/runners/{a}/res/code",
            f"pairing/runners/{a}/events",
            f"pairing/apps/{c}/req/pair",
            f"pairing/apps/{c}/res/pair",
            f"pairing/apps/{c}/events",
        ],
        "C": [
            f"pairing/apps/{d}/req/pair",
            f"pairing/runners/{c}/req/code",  # its own name, but as a runner
            f"pairing/runners/{a}/req/code",
            f"pairing/apps/{c}/events",
            f"pairing/apps/{c}/res/pair",
        ],
        "D": [
            f"pairing/apps/{c}/req/pair",
            f"pairing/apps/{c}/req/unpair",
            f"pairing/runners/{a}/req/code",
            f"pairing/runners/{a}/events",
            f"pairing/apps/{c}/res/pair",
        ],
        "S": [
            f"pairing/runners/{a}/req/code",
            f"pairing/apps/{c}/req/pair",
            f"pairing/runners/{a}/status",
        ],
    }
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        contextlib.AsyncExitStack() as stack,
    ):
        # One connection per identity (its client id is its username): each client both
        # snoops and forges, and goes on working normally afterwards.
        runner_a = await stack.enter_async_context(runner_client(broker, a))
        runner_b = await stack.enter_async_context(runner_client(broker, b))
        app_c = await stack.enter_async_context(app_client(broker, c))
        app_d = await stack.enter_async_context(app_client(broker, d, listener="app-ws"))
        service_account = await stack.enter_async_context(Sniffer(who["S"], "S"))
        sniffers: dict[str, Sniffer | RecordingRunner | RecordingApp] = {
            "A": runner_a,
            "B": runner_b,
            "C": app_c,
            "D": app_d,
            "S": service_account,
        }
        for label, sniffer in sniffers.items():
            await sniffer.subscribe([*snoop_filters(ids), f"$share/snoop{label}/pairing/#"])
        for label, topics in forbidden.items():
            for n, topic in enumerate(topics):
                await sniffers[label].publish(topic, forged(f"forged-{label}-{n}"))

        # A round trip: anything the broker let through before it has reached the service.
        assert await runner_b.sessions() == []
        await asyncio.sleep(SETTLE_S)
        dispatcher = service.gateway.dispatcher
        assert dict(dispatcher.counters) == {"ok.sessions": 1}
        assert dict(service.gateway.counters) == {}

        # A full pairing of A with C.
        issued = await runner_a.request_code(runner_name="A")
        paired = await app_c.pair(issued["code"], app_name="C")
        session_id = paired["session"]["session_id"]
        opened_a = await runner_a.next_event()
        opened_c = await app_c.next_event()
        assert opened_a["session"]["session_id"] == opened_c["session"]["session_id"] == session_id
        # B and D: their own traffic still flows (the snoopers' positive control).
        assert await runner_b.sessions() == []
        assert await app_d.sessions() == []
        await asyncio.sleep(SETTLE_S)

        code_forms = {issued["code"].encode(), issued["code"].replace("-", "").encode()}
        for label, sniffer in sniffers.items():
            topics = sniffer.topics()
            assert not [t for t in topics if t.startswith("$")], label
            for topic, payload in sniffer.received:
                assert FORGED_MARK.encode() not in payload, (label, topic)
        own = {
            "A": f"pairing/runners/{a}/",
            "B": f"pairing/runners/{b}/",
            "C": f"pairing/apps/{c}/",
            "D": f"pairing/apps/{d}/",
        }
        for label, prefix in own.items():
            strays = [t for t in sniffers[label].topics() if not t.startswith(prefix)]
            assert strays == [], f"{label} received others' topics: {strays}"
        # B and D received nothing of the pairing; A and C received it.
        for label in "BD":
            for topic, payload in sniffers[label].received:
                assert session_id.encode() not in payload, (label, topic)
                assert not any(form in payload for form in code_forms), (label, topic)
            assert set(sniffers[label].topics()) == {f"{own[label]}res/sessions"}
        assert {f"pairing/runners/{a}/res/code", f"pairing/runners/{a}/events"} <= set(
            sniffers["A"].topics()
        )
        assert {f"pairing/apps/{c}/res/pair", f"pairing/apps/{c}/events"} <= set(
            sniffers["C"].topics()
        )
        # The service account reads requests and presence, and nothing else.
        request_or_status = re.compile(r"^pairing/(runners|apps)/[^/]+/req/[^/]+$")
        for topic in sniffers["S"].topics():
            assert request_or_status.match(topic) or topic.endswith("/status"), topic
        assert f"pairing/runners/{a}/req/code" in sniffers["S"].topics()
        assert f"pairing/apps/{c}/req/pair" in sniffers["S"].topics()

        # Nothing forged had an effect on the service.
        assert dict(dispatcher.counters) == {"ok.sessions": 3, "ok.code": 1, "ok.pair": 1}
        assert dict(service.gateway.counters) == {}
        with redis_server.client() as db:
            keys = [k.decode() for k in db.scan_iter(match=f"{key_prefix.rstrip(':')}:*")]
        assert not [k for k in keys if "forged" in k]
        assert not [k for k in keys if f"{{app:{d}}}" in k or f"{{runner:{b}}}:sessions" in k]
        assert [s["session_id"] for s in await app_c.sessions()] == [session_id]
        assert [s["session_id"] for s in await runner_a.sessions()] == [session_id]
