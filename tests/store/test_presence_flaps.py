"""A runner flapping its presence: a bounded number of announcements, the last state right.

docs/protocol.md "Events": at most `announce_max` presence changes are announced per
window per runner; further changes are recorded, and the presence when the window
allows is announced then (`record_status` with no state, which the presence recorder
calls when `held` says). Before the bound, each of the 300 flips was announced to every
paired app: enough to fill an offline app's broker queue and lose its later events.
Real Redis, fakeredis and the cluster (the `api` fixture); the window is a real one.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time

from mqtt_pairing.store.redis_store import OutboxEntry
from mqtt_pairing.topics import Kind
from tests.store.helpers import Api, new_id

FLIPS = 300
MAX = 4
WINDOW_S = 2


async def test_flaps_are_announced_within_the_bound_and_the_last_state_at_last(
    api: Api,
) -> None:
    code = await api.code("r1")
    paired = await api.handle(Kind.APP, "a1", "pair", {"request_id": new_id(), "code": code})
    assert paired.reply is not None
    assert paired.reply["ok"], paired.reply
    store = api.store
    common = {
        "heartbeat_online_s": 30,
        "idle_ttl_s": 3600,
        "announce_max": MAX,
        "announce_window_s": WINDOW_S,
    }
    # The first known state is recorded without an event.
    assert await store.record_status("r1", "online", retained=False, **common) == []

    delays: list[float] = []
    announced: list[OutboxEntry] = []
    started = time.monotonic()
    for n in range(FLIPS):
        state = "offline" if n % 2 == 0 else "online"
        announced += await store.record_status(
            "r1", state, retained=False, held=delays.append, **common
        )
    await store.record_status("r1", "offline", retained=False, held=delays.append, **common)
    elapsed = time.monotonic() - started
    # Each window (however many a loaded machine took) announces at most MAX changes.
    windows = math.floor(elapsed / WINDOW_S) + 1
    assert 0 < len(announced) <= MAX * windows, (len(announced), elapsed)
    types = [e.type for e in announced]
    assert all(a != b for a, b in itertools.pairwise(types)), types  # changes only
    assert delays, "a held-back change must say when it may be announced"
    assert all(0 < d <= WINDOW_S for d in delays), delays
    # What `sessions`, `status` and `pair` see is the latest state at once.
    assert (await store.presence(["r1"]))["r1"] is False

    # The window allows one again: the held-back state is announced if it differs.
    await asyncio.sleep(delays[-1] + 0.1)
    later = await store.record_status("r1", "", retained=False, **common)
    types += [e.type for e in later]
    assert types[-1] == "runner.offline", types
    # Announced once: nothing more, whoever asks again.
    assert await store.record_status("r1", "", retained=False, **common) == []
    assert await store.record_status("r1", "offline", retained=True, **common) == []


async def test_a_held_back_change_is_announced_by_a_replayed_status_or_a_heartbeat(
    api: Api,
) -> None:
    """If the instance that scheduled the announcement stops, the reconciliation's
    replayed retained status, or the runner's next heartbeat, announces it."""
    code = await api.code("r1")
    paired = await api.handle(Kind.APP, "a1", "pair", {"request_id": new_id(), "code": code})
    assert paired.reply is not None
    assert paired.reply["ok"], paired.reply
    store = api.store
    common = {"heartbeat_online_s": 30, "idle_ttl_s": 3600, "announce_max": 1}
    await store.record_status("r1", "online", retained=False, announce_window_s=1, **common)
    first = await store.record_status(
        "r1", "offline", retained=False, announce_window_s=1, **common
    )
    assert [e.type for e in first] == ["runner.offline"]
    delays: list[float] = []
    held = await store.record_status(
        "r1", "online", retained=False, announce_window_s=1, held=delays.append, **common
    )
    assert held == []
    assert delays
    await asyncio.sleep(delays[0] + 0.1)
    replayed = await store.record_status(
        "r1", "online", retained=True, announce_window_s=1, **common
    )
    assert [e.type for e in replayed] == ["runner.online"]

    delays.clear()
    assert (
        await store.record_status(
            "r1", "offline", retained=False, announce_window_s=1, held=delays.append, **common
        )
        == []
    )
    assert delays
    await asyncio.sleep(delays[0] + 0.1)
    beat = await store.heartbeat(
        "r1", idle_ttl_s=3600, heartbeat_online_s=30, announce_max=1, announce_window_s=1
    )
    # The heartbeat is the newer sign: online again, nothing to announce (the last
    # announced state is online); the offline in between was never announced.
    assert beat == []
    assert (await store.presence(["r1"]))["r1"] is True
