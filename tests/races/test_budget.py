"""The global failure budget across two `serve` processes (docs/protocol.md "Default limits").

Two processes share the requests (one shared group) and one budget in Redis. Guesses
from many apps arrive at once: exactly `PAIRING_GLOBAL_FAIL_LIMIT` are looked up
(CODE_NOT_FOUND), whichever process took them, and every other one is RATE_LIMITED; each
process's `/metrics` shows it took a share.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

import pytest

from tests.harness.fixtures import MakeServe
from tests.harness.recorder import Recorder
from tests.harness.serve import http_text, metric

pytestmark = [pytest.mark.redis, pytest.mark.mosquitto, pytest.mark.timeout(90)]

LIMIT = 12
GUESSERS = 60
WINDOW_S = 600
"""Far longer than the test: every guess falls in one window."""


async def test_the_budget_holds_across_two_processes(
    serve_process: MakeServe, recorder: Recorder, topic_prefix: str
) -> None:
    env = {
        "PAIRING_SHARED_GROUP": f"budget-{uuid.uuid4().hex[:8]}",
        "PAIRING_GLOBAL_FAIL_LIMIT": str(LIMIT),
        "PAIRING_GLOBAL_FAIL_WINDOW_S": str(WINDOW_S),
        "PAIRING_FAIL_LIMIT": "1000",
        "PAIRING_APP_REQUEST_LIMIT": "1000",
    }
    serves = [serve_process(**env) for _ in range(2)]
    for serve in serves:
        serve.start()
    for serve in serves:
        await serve.wait_ready()

    request_ids = {f"g{i:02d}": uuid.uuid4().hex for i in range(GUESSERS)}
    await asyncio.gather(
        *(
            recorder.publish(
                f"{topic_prefix}/apps/{app}/req/pair",
                json.dumps({"request_id": rid, "code": f"{i:03d}-000-000"}),
            )
            for i, (app, rid) in enumerate(request_ids.items())
        )
    )

    def replies() -> dict[str, dict[str, object]]:
        return {
            app: reply
            for app in request_ids
            for reply in recorder.replies("app", app, "pair")
            if reply.get("request_id") == request_ids[app]
        }

    await recorder.wait_for(lambda: len(replies()) == GUESSERS, "every guess answered", 30)
    outcomes = Counter(
        "ok" if r["ok"] else r["error"]["code"]  # type: ignore[index]
        for r in replies().values()
    )
    assert outcomes == {"CODE_NOT_FOUND": LIMIT, "RATE_LIMITED": GUESSERS - LIMIT}, outcomes

    taken = []
    for serve in serves:
        assert serve.health is not None
        status, text = await http_text(*serve.health, "/metrics")
        assert status == 200
        taken.append(
            {
                outcome: metric(text, "mqtt_pairing_replies_total", op="pair", outcome=outcome)
                for outcome in ("CODE_NOT_FOUND", "RATE_LIMITED")
            }
        )
    assert sum(t["CODE_NOT_FOUND"] for t in taken) == LIMIT, taken
    assert all(sum(t.values()) > 0 for t in taken), ("one process took no guess", taken)
