"""Presence (docs/protocol.md "Presence"): retained status, Last Will, heartbeats, events.

Paired apps get exactly one `runner.online` / `runner.offline` per change between online
and offline, however many service instances run, and none for a retained status the
broker replays on resubscribe. Counts are taken on the wire (copies included).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from mqtt_pairing.client import ReplyError
from tests.lifecycle.conftest import OpenStatusLink, Peers, StartService
from tests.lifecycle.support import (
    Wire,
    pair_apps,
    parse_ts,
    wait_presence_holder,
    wait_statuses,
)

pytestmark = pytest.mark.timeout(60)

KEEPALIVE_S = 2
# MQTT says the broker drops a silent client after keepalive x 1.5. Mosquitto 2.0.11 keeps
# keepalive deadlines in one-second buckets checked from its event loop; measured here
# without the service, an idle broker published the Will 3.4-4.7 s after the last packet
# for a keepalive of 2 s, and up to 7.5 s on a loaded machine. That part is the broker's
# and gets a generous allowance; the service's own part (Will received -> runner.offline
# published) is bounded tightly by HANDLING_S.
BROKER_SLACK_S = 6.0
HANDLING_S = 0.5


def check_presence_event(event: dict[str, Any], name: str, runner_id: str, session_id: str):
    assert event["event"] == name
    assert event["runner_id"] == runner_id
    assert event["session_id"] == session_id
    assert isinstance(event["event_id"], str)
    assert event["event_id"]
    parse_ts(event["at"])


async def settle(seconds: float = 0.6) -> None:
    """Give stray copies time to arrive before counting."""
    await asyncio.sleep(seconds)


async def online_of(app: Any) -> list[bool | None]:
    status = await app.status()
    return [r["online"] for r in status["runners"]]


@pytest.mark.parametrize("drop", ["silent", "reset"])
async def test_last_will_sends_one_offline_to_each_paired_app(
    drop: str,
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
) -> None:
    """A runner that vanishes without DISCONNECT is offline as soon as the broker says so.

    The Last Will comes after keepalive x 1.5 (plus the broker's own slack, see
    BROKER_SLACK_S); the service turns it into runner.offline within HANDLING_S.

    `silent`: the connection stays open but nothing more is sent (the broker's keepalive
    timeout fires); `reset`: the TCP connection is reset, as when the process crashes.
    """
    svc = await start_service()
    async with peers.runner("r1") as runner, peers.app("a1") as a1, peers.app("a2") as a2:
        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses([svc], 1)
        s1, s2 = await pair_apps(runner, a1, a2)
        assert await online_of(a1) == [True]

        await asyncio.to_thread(link.go_silent if drop == "silent" else link.reset)
        assert link.dropped_at is not None
        limit = KEEPALIVE_S * 1.5 + BROKER_SLACK_S + HANDLING_S
        for app_id in ("a1", "a2"):
            await wire.wait_events("app", app_id, "runner.offline", timeout_s=limit + 2)
        will = [m for m in wire.statuses("r1") if m.body == {"state": "offline"}]
        assert len(will) == 1, "the broker published the Last Will once"
        arrived = max(m.at for m in wire.seen if m.body.get("event") == "runner.offline")
        took = arrived - link.dropped_at
        handling = arrived - will[0].at
        assert handling <= HANDLING_S, f"Will to runner.offline took {handling:.2f} s"
        assert took <= limit, f"offline after {took:.2f} s (limit {limit:.2f} s)"
        if drop == "reset":
            assert took <= 1.0, took  # the broker sees the reset at once

        await settle()
        for app_id, session in (("a1", s1), ("a2", s2)):
            (event,) = wire.presence_events(app_id, copies=True)  # not even a copy
            check_presence_event(event, "runner.offline", "r1", session["session_id"])
        assert wire.events("runner", "r1", "runner.offline") == []
        assert (
            wire.events("app", "a1", "runner.offline")[0]["event_id"]
            != (wire.events("app", "a2", "runner.offline")[0]["event_id"])
        )
        assert await online_of(a1) == [False]
        assert await online_of(a2) == [False]


async def test_clean_disconnect_after_offline_and_coming_back(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
) -> None:
    """Offline published before a clean DISCONNECT: one runner.offline; back: one online."""
    svc = await start_service()
    async with peers.runner("r1") as runner, peers.app("a1") as a1, peers.app("a2") as a2:
        s1, s2 = await pair_apps(runner, a1, a2)
        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses([svc], 1)
        await settle(0.3)
        # The first known state is only recorded: unknown -> online says nothing.
        assert wire.presence_events("a1") == []
        assert await online_of(a1) == [True]

        await asyncio.to_thread(link.publish, "offline")
        await asyncio.to_thread(link.disconnect)
        for app_id in ("a1", "a2"):
            await wire.wait_events("app", app_id, "runner.offline")
        # A Will would follow a dropped connection at once; none may follow a DISCONNECT.
        await settle(1.0)
        for app_id, session in (("a1", s1), ("a2", s2)):
            (event,) = wire.presence_events(app_id)
            check_presence_event(event, "runner.offline", "r1", session["session_id"])
        assert await online_of(a2) == [False]

        back = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(back.publish, "online")
        for app_id in ("a1", "a2"):
            await wire.wait_events("app", app_id, "runner.online")
        await settle()
        for app_id, session in (("a1", s1), ("a2", s2)):
            offline, online = wire.presence_events(app_id)
            check_presence_event(online, "runner.online", "r1", session["session_id"])
            assert online["event_id"] != offline["event_id"]
        assert await online_of(a1) == [True]


async def test_heartbeats_alone_make_a_runner_online(
    start_service: StartService, peers: Peers, wire: Wire
) -> None:
    """No status message at all: a heartbeat makes the runner online; no event for it."""
    await start_service(pairing_heartbeat_online_s=2)
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        await pair_apps(runner, a1)
        assert await online_of(a1) == [None]
        await runner.heartbeat()
        deadline = time.monotonic() + 3
        while await online_of(a1) != [True]:
            assert time.monotonic() < deadline, "a heartbeat did not make the runner online"
            await asyncio.sleep(0.05)
        await settle(0.3)
        assert wire.presence_events("a1") == []
        assert wire.replies("runner", "r1", "heartbeat") == []  # no reply unless it fails


async def test_heartbeat_presence_lapses_to_unknown(
    start_service: StartService, peers: Peers, wire: Wire
) -> None:
    """Heartbeats alone: online, then unknown (null) once PAIRING_HEARTBEAT_ONLINE_S passes."""
    await start_service(pairing_heartbeat_online_s=2)
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        await pair_apps(runner, a1)
        await runner.heartbeat()
        deadline = time.monotonic() + 3
        while await online_of(a1) != [True]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.5)
        assert await online_of(a1) == [None]
        assert wire.presence_events("a1") == []  # online -> unknown says nothing


async def test_pair_with_known_offline_runner_is_runner_offline(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
) -> None:
    """RUNNER_OFFLINE is not remembered and gives the use back; a newer heartbeat wins."""
    svc = await start_service()
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        code = (await runner.request_code())["code"]
        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "offline")
        await wait_statuses([svc], 1)

        request = {"code": code, "request_id": "pair-while-offline"}
        with pytest.raises(ReplyError) as caught:
            await a1.call("pair", request)
        assert caught.value.code == "RUNNER_OFFLINE"
        assert await a1.sessions() == []

        # Newer than the offline status, a heartbeat makes the runner not offline. The same
        # request is handled afresh (not replayed) and the single use is still there.
        await runner.heartbeat()
        deadline = time.monotonic() + 3
        while True:
            reply = await a1.request("pair", request)
            if reply["ok"] or reply["error"]["code"] != "RUNNER_OFFLINE":
                break
            assert time.monotonic() < deadline, "the heartbeat was never recorded"
            await asyncio.sleep(0.05)
        assert reply["ok"], reply
        sid = reply["result"]["session"]["session_id"]
        await wire.wait_events("app", "a1", "session.opened")
        assert [s["session_id"] for s in await a1.sessions()] == [sid]


async def test_two_instances_one_event_per_change(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
    topic_prefix: str,
) -> None:
    """Two instances in a shared group; paired apps get one event per change each."""
    group = f"lc-{topic_prefix[-12:]}"
    svc_a = await start_service(pairing_shared_group=group)
    svc_b = await start_service(pairing_shared_group=group)
    both = [svc_a, svc_b]
    async with peers.runner("r1") as runner, peers.app("a1") as a1, peers.app("a2") as a2:
        s1, s2 = await pair_apps(runner, a1, a2)
        # Requests went through the shared group: each was handled by one instance.
        handled = [s.counters["ok.pair"] for s in both]
        assert sum(handled) == 2, handled

        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses(both, 1)  # first known state: recorded, no event

        await asyncio.to_thread(link.reset)  # Last Will -> offline
        await wait_statuses(both, 2)
        await wire.wait_events("app", "a2", "runner.offline")

        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses(both, 3)
        await wire.wait_events("app", "a2", "runner.online")

        await asyncio.to_thread(link.publish, "offline")
        await asyncio.to_thread(link.disconnect)
        await wait_statuses(both, 4)
        await wire.wait_events("app", "a2", "runner.offline", count=2)

        # A heartbeat (one instance only, via the shared group) after offline: online.
        await runner.heartbeat()
        await wire.wait_events("app", "a2", "runner.online", count=2)
        await settle()

        expected = ["runner.offline", "runner.online", "runner.offline", "runner.online"]
        for app_id, session in (("a1", s1), ("a2", s2)):
            got = wire.presence_events(app_id)
            assert [e["event"] for e in got] == expected
            assert len({e["event_id"] for e in got}) == len(expected)
            for event in got:
                check_presence_event(event, event["event"], "r1", session["session_id"])
        assert await online_of(a1) == [True]


async def test_two_instances_one_lagging(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
) -> None:
    """One instance handles the runner's status messages late (GC pause, slow Redis link).

    The runner goes offline, then online again: two changes, so two events per app, and
    its presence must end online. Status messages carry no order of their own, so only
    the holder of the presence lease (here A) records them.
    """
    group = f"lag-{uuid.uuid4().hex[:8]}"
    svc_a = await start_service(pairing_shared_group=group)
    await wait_presence_holder(svc_a)
    svc_b = await start_service(pairing_shared_group=group)
    both = [svc_a, svc_b]
    gate = asyncio.Event()
    gate.set()
    dispatcher_b = svc_b.service.gateway.dispatcher
    handle_status = dispatcher_b.handle_status

    async def late_handle_status(*args: Any, **kwargs: Any) -> Any:
        await gate.wait()
        return await handle_status(*args, **kwargs)

    dispatcher_b.handle_status = late_handle_status  # type: ignore[method-assign]
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        await pair_apps(runner, a1)
        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses(both, 1)

        gate.clear()  # instance B falls behind
        await asyncio.to_thread(link.publish, "offline")
        await wire.wait_events("app", "a1", "runner.offline")
        await asyncio.to_thread(link.publish, "online")
        await wire.wait_events("app", "a1", "runner.online")
        gate.set()  # B catches up with whatever it holds
        await wait_statuses(both, 3)
        await settle()
        assert svc_b.counters["status"] == 0  # B never recorded a status

        assert [e["event"] for e in wire.presence_events("a1")] == [
            "runner.offline",
            "runner.online",
        ]
        assert await online_of(a1) == [True]


async def test_retained_status_replayed_on_restart_sends_nothing(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
    topic_prefix: str,
) -> None:
    """A restarted service gets the retained statuses again; no runner.* event follows.

    r1's retained status is `online`; r2's is its Last Will `offline`, but a heartbeat
    came after it, so r2 is online and the replayed offline must not undo that.
    """
    client_id = f"lc-restart:{topic_prefix[-12:]}"
    svc = await start_service(mqtt_client_id=client_id)
    async with (
        peers.runner("r1") as r1,
        peers.runner("r2") as r2,
        peers.app("a1") as a1,
        peers.app("a2") as a2,
    ):
        await pair_apps(r1, a1)
        await pair_apps(r2, a2)
        link1 = await status_link("r1", keepalive_s=KEEPALIVE_S)
        link2 = await status_link("r2", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link1.publish, "online")
        await asyncio.to_thread(link2.publish, "online")
        await wait_statuses([svc], 2)
        await asyncio.to_thread(link2.reset)
        await wire.wait_events("app", "a2", "runner.offline")
        await r2.heartbeat()
        await wire.wait_events("app", "a2", "runner.online")
        await settle(0.3)
        before = [list(wire.presence_events(a)) for a in ("a1", "a2")]
        assert [[e["event"] for e in b] for b in before] == [
            [],
            ["runner.offline", "runner.online"],
        ]

        for restart in range(2):
            await svc.stop()
            # Same client id (a restart) the first time; a new instance the second time.
            new_id = client_id if restart == 0 else f"{client_id}-b"
            svc = await start_service(mqtt_client_id=new_id)
            await wait_statuses([svc], 2)  # both retained statuses were replayed
            await settle()
            after = [wire.presence_events(a) for a in ("a1", "a2")]
            assert after == before, f"restart {restart}: {after}"
            assert await online_of(a1) == [True]
            assert await online_of(a2) == [True]


async def test_presence_lease_moves_when_its_holder_stops(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
) -> None:
    """The holder stops; another instance takes the lease and records what follows."""
    group = f"fo-{uuid.uuid4().hex[:8]}"
    svc_a = await start_service(pairing_shared_group=group, pairing_presence_lease_s=1.0)
    await wait_presence_holder(svc_a)
    svc_b = await start_service(pairing_shared_group=group, pairing_presence_lease_s=1.0)
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        await pair_apps(runner, a1)
        link = await status_link("r1", keepalive_s=KEEPALIVE_S)
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses([svc_a], 1)
        await svc_a.stop()  # gives the lease up
        await wait_presence_holder(svc_b)
        await asyncio.to_thread(link.publish, "offline")
        await wire.wait_events("app", "a1", "runner.offline")
        await settle()
        assert [e["event"] for e in wire.presence_events("a1")] == ["runner.offline"]
        assert await online_of(a1) == [False]
