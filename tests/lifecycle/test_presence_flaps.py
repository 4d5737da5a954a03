"""A runner flapping its retained status, end to end on Mosquitto (docs/protocol.md
"Events"): its paired app gets at most `MAX` presence events per `WINDOW_S`, and the
runner's last state at last. Before the bound every flip was announced (the attack that
filled an offline app's broker queue with 10,500 of them, losing its later events).
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from tests.harness.waiting import wait_until
from tests.lifecycle.conftest import OpenStatusLink, Peers, StartService
from tests.lifecycle.support import Wire, pair_apps, wait_statuses

pytestmark = pytest.mark.timeout(120)

FLIPS = 300
MAX = 4
WINDOW_S = 2


async def test_a_flapping_runner_is_announced_within_the_bound_and_ends_right(
    start_service: StartService,
    peers: Peers,
    wire: Wire,
    status_link: OpenStatusLink,
) -> None:
    svc = await start_service(
        pairing_presence_announce_max=MAX, pairing_presence_announce_window_s=WINDOW_S
    )
    async with peers.runner("r1") as runner, peers.app("a1") as a1:
        (session,) = await pair_apps(runner, a1)
        link = await status_link("r1")
        await asyncio.to_thread(link.publish, "online")
        await wait_statuses([svc], 1)

        def flap() -> None:
            for n in range(FLIPS):
                link.publish("offline" if n % 2 == 0 else "online")
            link.publish("offline")

        started = time.monotonic()
        await asyncio.to_thread(flap)
        await wait_statuses([svc], 2 + FLIPS, timeout_s=60)
        elapsed = time.monotonic() - started

        def last_is_offline() -> bool:
            got = wire.presence_events("a1")
            return bool(got) and got[-1]["event"] == "runner.offline"

        await wait_until(last_is_offline, WINDOW_S + 10, "runner.offline announced at last")
        await asyncio.sleep(WINDOW_S + 0.5)  # nothing more comes
        events = wire.presence_events("a1")
        # One window more than the flips took: the held-back state announced after them.
        bound = MAX * (math.floor(elapsed / WINDOW_S) + 2)
        assert len(events) <= bound, (len(events), elapsed)
        assert len(events) < FLIPS // 2
        assert events[-1]["event"] == "runner.offline"
        assert all(e["session_id"] == session["session_id"] for e in events)
        status = await a1.status()
        assert [r["online"] for r in status["runners"]] == [False]
