"""Each event published once when nothing fails (docs/design.md "Delivery").

A pair writes its events (docs/protocol.md "Events": `session.opened` to the runner and to
the app, `code.used` to the runner: 3 messages) to the runner's outbox, in the script that
opens the session, and publishes them itself. Pairs of one runner that run at once share
that outbox; each must publish the entries its own script wrote, not what the others
wrote too. Counted at the broker (a recorder of `#` on real Mosquitto, the service on
real Redis), copies with the same `event_id` included.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter

import pytest

from mqtt_pairing.store.redis_store import PairingStore
from tests.harness.peers import Peers
from tests.harness.recorder import Recorder
from tests.harness.service import RunningService
from tests.harness.waiting import wait_until

EVENTS_PER_PAIR = 3
APPS = 10


async def _outboxes_empty(store: PairingStore, runner_ids: list[str]) -> bool:
    keys = [store.keys.outbox(r) for r in runner_ids]
    return sum([int(await store.client.exists(k)) for k in keys]) == 0


@pytest.mark.parametrize(
    ("runners", "uses"),
    [
        pytest.param(1, APPS, id="one-code-10-uses"),
        pytest.param(APPS, 1, id="spread-over-runners"),
        pytest.param(APPS // 2, 2, id="two-per-runner"),
    ],
)
async def test_each_pair_publishes_its_own_events_once(
    running_service: RunningService,
    peers: Peers,
    recorder: Recorder,
    runners: int,
    uses: int,
) -> None:
    tag = uuid.uuid4().hex[:6]
    runner_ids = [f"r{n}-{tag}" for n in range(runners)]
    app_ids = [f"a{n}-{tag}" for n in range(APPS)]
    store = running_service.service.gateway.dispatcher.store
    async with contextlib.AsyncExitStack() as stack:
        runner_clients = [await stack.enter_async_context(peers.runner(r)) for r in runner_ids]
        app_clients = [await stack.enter_async_context(peers.app(a)) for a in app_ids]
        codes = [(await c.request_code(max_uses=uses))["code"] for c in runner_clients]
        # Every app's request at once; app n takes a use of runner n % runners's code.
        replies = await asyncio.gather(
            *(
                app.request("pair", {"code": codes[n % runners]})
                for n, app in enumerate(app_clients)
            )
        )
        assert all(r["ok"] for r in replies), replies
        sessions = {r["result"]["session"]["session_id"] for r in replies}
        assert len(sessions) == APPS
        # Whatever is still to come: the outboxes drained (each pair acknowledged its
        # entries, nothing left for a sweep), then everything published before is here.
        await wait_until(
            lambda: _outboxes_empty(store, runner_ids), 10, "the outboxes to be drained"
        )
        await asyncio.sleep(2 * running_service.settings.pairing_sweep_interval_s)
        await recorder.barrier()

    parties = [("runner", r) for r in runner_ids] + [("app", a) for a in app_ids]
    received = [(ident, e) for kind, ident in parties for e in recorder.events(kind, ident)]  # type: ignore[arg-type]
    delivered = [e for _, e in received]
    # A session.opened has one event_id for both parties: copies are per recipient.
    by_id = Counter((ident, e["event_id"]) for ident, e in received)
    names = Counter(e["event"] for e in delivered)
    per_pair = len(delivered) / APPS
    assert len(delivered) == EVENTS_PER_PAIR * APPS, (per_pair, names, by_id.most_common(3))
    assert max(by_id.values()) == 1, ("copies", by_id.most_common(3))
    assert names == {"session.opened": 2 * APPS, "code.used": APPS}, names
    opened = [e["session"]["session_id"] for e in delivered if e["event"] == "session.opened"]
    assert Counter(opened) == dict.fromkeys(sessions, 2), opened  # the runner's and the app's
