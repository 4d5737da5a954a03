"""End to end on Mosquitto with `REDIS_CLUSTER_URL`: code, pair (three slots on up to
three masters), idempotent retry, sessions, status, unpair by either side, refusals, the
admin revoke path (store.close_sessions + mark_outbox_due) and the history; every script
call of it keeps to one slot."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mqtt_pairing.admin import AdminService
from mqtt_pairing.client import AppClient, PairingClient, ReplyError, RunnerClient
from mqtt_pairing.models import ClosedReason
from mqtt_pairing.store import PairingStore
from tests.cluster.support import recording_slots
from tests.harness.waiting import wait_until
from tests.service.support import (
    CODE_RE,
    EVENT_TIMEOUT_S,
    Peers,
    StartService,
    check_event_envelope,
)

RUNNER_METADATA = {"os": "linux", "tags": ["ci", "ünïcødé"]}


async def next_of(
    client: PairingClient, name: str, session_id: str | None = None
) -> dict[str, Any]:
    """The next event `name` (about `session_id` unless None), skipping others."""
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while True:
            event = await client.next_event(EVENT_TIMEOUT_S)
            about = event.get("session", {}).get("session_id") or event.get("session_id")
            if event["event"] == name and session_id in (None, about):
                check_event_envelope(event)
                return event


async def pair(runner: RunnerClient, app: AppClient, code: str, **fields: Any) -> str:
    """Pair and wait until both sides heard `session.opened`; the session_id."""
    paired = await app.pair(code, **fields)
    session = paired["session"]
    sid: str = session["session_id"]
    assert (await next_of(runner, "session.opened", sid))["session"] == session
    assert (await next_of(app, "session.opened", sid))["session"] == session
    return sid


async def closed(client: PairingClient, sid: str, reason: str) -> None:
    event = await next_of(client, "session.closed", sid)
    assert event["session"]["state"] == "closed"
    assert event["session"]["closed_reason"] == reason


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    await wait_until(check, timeout_s, "the condition", interval_s=0.05)


async def test_the_whole_pair_flow_on_the_cluster(
    start_cluster_service: StartService,
    peers: Peers,
    cluster_store: PairingStore,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with recording_slots(monkeypatch) as recorder:
        running = await start_cluster_service()
        settings = running.settings
        admin = AdminService(cluster_store, settings, actor="tests")
        async with (
            peers.runner("r1") as runner,
            peers.app("a1") as a1,
            peers.app("a2") as a2,
            peers.app("a3") as a3,
            peers.app("a4") as a4,
        ):
            issued = await runner.request_code(
                runner_name="build box", metadata=RUNNER_METADATA, public_key="pk-r", max_uses=3
            )
            code = issued["code"]
            assert CODE_RE.fullmatch(code)
            assert issued["max_uses"] == 3

            # pair; the reply and both sides' events agree
            paired = await a1.pair(code.lower().replace("-", " "), app_name="phone")
            s1 = paired["session"]["session_id"]
            assert paired["runner_metadata"] == RUNNER_METADATA
            assert paired["runner_public_key"] == "pk-r"
            assert paired["session"]["runner_name"] == "build box"
            assert (await next_of(runner, "session.opened", s1))["session"] == paired["session"]
            assert (await next_of(a1, "session.opened", s1))["session"] == paired["session"]
            used = await next_of(runner, "code.used")
            assert used["uses_left"] == 2

            # a retried request (same request_id) ends with the same session, one use
            first = await a2.call("pair", {"code": code, "request_id": "retry-1"})
            again = await a2.call("pair", {"code": code, "request_id": "retry-1"})
            assert again == first
            s2 = first["session"]["session_id"]
            await next_of(runner, "session.opened", s2)

            s3 = await pair(runner, a3, code)
            with pytest.raises(ReplyError) as caught:
                await a4.pair(code)
            assert caught.value.code == "CODE_ALREADY_USED"
            with pytest.raises(ReplyError) as caught:
                await a4.pair("000-000-000")
            assert caught.value.code == "CODE_NOT_FOUND"

            # listing and status
            assert {s["session_id"] for s in await runner.sessions()} == {s1, s2, s3}
            assert [s["session_id"] for s in await a1.sessions()] == [s1]
            status = await a1.status()
            assert status["paired"] is True
            assert [r["runner_id"] for r in status["runners"]] == ["r1"]

            # unpair by the app, then by the runner
            assert await a1.unpair(s1) == 1
            await closed(runner, s1, "unpaired_by_app")
            await closed(a1, s1, "unpaired_by_app")
            assert await a1.sessions() == []
            assert await runner.unpair(app_id="a2") == 1
            await closed(runner, s2, "unpaired_by_runner")
            await closed(a2, s2, "unpaired_by_runner")

            # the admin revoke path: close in the runner's slot, then mark the outbox
            # due; the running service publishes the events to both sides
            found = await cluster_store.find_session(s3)
            assert found == ("r1", "a3")
            revoked, outbox = await cluster_store.close_sessions(
                "r1", session_id=s3, reason=ClosedReason.REVOKED
            )
            assert [s.session_id for s in revoked] == [s3]
            assert [e.type for e in outbox] == ["session.closed"]
            await cluster_store.mark_outbox_due(
                "r1", delay_s=0, shards=settings.pairing_index_shards
            )
            await closed(runner, s3, "revoked")
            await closed(a3, s3, "revoked")
            assert await runner.sessions() == []
            assert await cluster_store.find_session(s3) is None

            # a new code pairs again, and the AdminService revoke reaches both sides
            code2 = (await runner.request_code())["code"]
            s4 = await pair(runner, a4, code2)
            assert (await admin.revoke_session(s4)).closed_reason == ClosedReason.REVOKED
            await closed(runner, s4, "revoked")
            await closed(a4, s4, "revoked")

            # the history, by identity and global, holds all of it
            async def history_complete() -> bool:
                page = await admin.history(runner_id="r1", limit=100)
                return {r.entry.event for r in page.records} >= {
                    "code.issued",
                    "pair.succeeded",
                    "session.closed",
                }

            await eventually(history_complete)
            a4_history = await admin.history(app_id="a4", limit=100)
            failed = [r.entry for r in a4_history.records if r.entry.event == "pair.failed"]
            assert sorted(e.error_code or "" for e in failed) == [
                "CODE_ALREADY_USED",
                "CODE_NOT_FOUND",
            ]
            assert code not in repr(a4_history)
            stats = await admin.stats(3600)
            assert stats.events["pair.succeeded"] == 4
            assert stats.active_sessions == 0
        running.assert_serving()
    recorder.assert_one_slot_each()
    assert recorder.errors == []
    assert {"claim_code", "open_session", "close_sessions", "claim_due"} <= recorder.names
