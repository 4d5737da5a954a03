"""End to end: unpair by either side, sessions that are not the caller's, re-pairing."""

from __future__ import annotations

from typing import Any

import pytest

from mqtt_pairing.client import AppClient, ReplyError, RunnerClient
from tests.service.support import (
    Peers,
    RunningService,
    StartService,
    by_event,
    check_event_envelope,
    events,
    no_more_events,
)


async def pair(runner: RunnerClient, app: AppClient, **code_fields: Any) -> dict[str, Any]:
    """Pair `app` with `runner`; drain the events of the pairing; return the session."""
    code = (await runner.request_code(**code_fields))["code"]
    session: dict[str, Any] = (await app.pair(code))["session"]
    runner_events = by_event(await events(runner, 2))
    assert runner_events["session.opened"][0]["session"] == session
    assert len(runner_events["code.used"]) == 1
    (opened,) = await events(app, 1)
    assert opened["event"] == "session.opened"
    return session


async def closed_event(client: AppClient | RunnerClient, session_id: str) -> dict[str, Any]:
    (event,) = await events(client, 1)
    check_event_envelope(event)
    assert event["event"] == "session.closed"
    assert event["session"]["session_id"] == session_id
    assert event["session"]["state"] == "closed"
    return event


async def test_unpair_by_app(running_service: RunningService, peers: Peers) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        session = await pair(runner, app)
        sid = session["session_id"]
        assert await app.unpair(sid) == 1
        for client in (runner, app):
            event = await closed_event(client, sid)
            assert event["session"]["closed_reason"] == "unpaired_by_app"
        assert await runner.sessions() == []
        assert await app.sessions() == []
        status = await app.status()
        assert status == {"paired": False, "runners": []}
        # A closed session cannot be closed again.
        with pytest.raises(ReplyError) as caught:
            await app.unpair(sid)
        assert caught.value.code == "SESSION_NOT_FOUND"
        await no_more_events(runner)
        await no_more_events(app)


async def test_unpair_by_runner(running_service: RunningService, peers: Peers) -> None:
    async with (
        peers.runner("r1") as runner,
        peers.app("a1") as a1,
        peers.app("a2") as a2,
        peers.app("a3") as a3,
    ):
        code = (await runner.request_code(max_uses=3))["code"]
        sessions = {}
        for app in (a1, a2, a3):
            sessions[app.identity.id] = (await app.pair(code))["session"]["session_id"]
            (opened,) = await events(app, 1)
            assert opened["event"] == "session.opened"
        runner_events = by_event(await events(runner, 6))
        assert len(runner_events["session.opened"]) == 3
        assert sorted(e["uses_left"] for e in runner_events["code.used"]) == [0, 1, 2]
        assert len(await runner.sessions()) == 3

        # Exactly one of session_id, app_id, all.
        for which in (
            {},
            {"session_id": sessions["a1"], "all": True},
            {"app_id": "a1", "all": True},
        ):
            with pytest.raises(ReplyError) as caught:
                await runner.unpair(**which)
            assert caught.value.code == "INVALID_REQUEST", which
        with pytest.raises(ReplyError) as caught:
            await runner.unpair(session_id="no-such-session")
        assert caught.value.code == "SESSION_NOT_FOUND"
        assert await runner.unpair(app_id="a9") == 0
        assert len(await runner.sessions()) == 3

        assert await runner.unpair(session_id=sessions["a1"]) == 1
        for client in (runner, a1):
            event = await closed_event(client, sessions["a1"])
            assert event["session"]["closed_reason"] == "unpaired_by_runner"

        assert await runner.unpair(app_id="a2") == 1
        for client in (runner, a2):
            event = await closed_event(client, sessions["a2"])
            assert event["session"]["closed_reason"] == "unpaired_by_runner"

        assert await runner.unpair(all=True) == 1
        for client in (runner, a3):
            event = await closed_event(client, sessions["a3"])
            assert event["session"]["closed_reason"] == "unpaired_by_runner"

        assert await runner.unpair(all=True) == 0
        assert await runner.sessions() == []
        for client in (runner, a1, a2, a3):
            await no_more_events(client, 0.1)
            assert await client.sessions() == []


async def test_app_cannot_unpair_another_apps_session(
    running_service: RunningService, peers: Peers
) -> None:
    async with (
        peers.runner("r1") as runner,
        peers.runner("r2") as other_runner,
        peers.app("a1") as a1,
        peers.app("a2") as a2,
    ):
        session = await pair(runner, a1)
        sid = session["session_id"]
        for caller in (a2,):
            with pytest.raises(ReplyError) as caught:
                await caller.unpair(sid)
            assert caught.value.code == "SESSION_NOT_FOUND"
        # A runner cannot close another runner's session either.
        with pytest.raises(ReplyError) as caught:
            await other_runner.unpair(session_id=sid)
        assert caught.value.code == "SESSION_NOT_FOUND"
        assert await other_runner.unpair(app_id="a1") == 0
        # Unknown session ids.
        with pytest.raises(ReplyError) as caught:
            await a1.unpair("no-such-session")
        assert caught.value.code == "SESSION_NOT_FOUND"
        # The session is untouched.
        assert [s["session_id"] for s in await runner.sessions()] == [sid]
        assert [s["session_id"] for s in await a1.sessions()] == [sid]
        await no_more_events(runner)
        await no_more_events(a1)


async def test_repairing_replaces_the_session(
    running_service: RunningService, peers: Peers
) -> None:
    async with (
        peers.runner("r1") as runner,
        peers.app("a1") as app,
        peers.app("a2") as bystander,
    ):
        first = await pair(runner, app)
        kept = await pair(runner, bystander)

        code = (await runner.request_code())["code"]
        second = (await app.pair(code))["session"]
        assert second["session_id"] != first["session_id"]
        assert second["state"] == "active"

        runner_events = by_event(await events(runner, 3))
        assert set(runner_events) == {"session.opened", "session.closed", "code.used"}
        assert runner_events["session.opened"][0]["session"] == second
        closed = runner_events["session.closed"][0]["session"]
        assert closed["session_id"] == first["session_id"]
        assert closed["closed_reason"] == "replaced"

        app_events = by_event(await events(app, 2))
        assert set(app_events) == {"session.opened", "session.closed"}
        assert app_events["session.opened"][0]["session"] == second
        assert app_events["session.closed"][0]["session"]["session_id"] == first["session_id"]
        assert app_events["session.closed"][0]["session"]["closed_reason"] == "replaced"

        runner_sessions = {s["session_id"]: s for s in await runner.sessions()}
        assert set(runner_sessions) == {second["session_id"], kept["session_id"]}
        assert [s["session_id"] for s in await app.sessions()] == [second["session_id"]]
        # The replaced session is gone for good.
        with pytest.raises(ReplyError) as caught:
            await app.unpair(first["session_id"])
        assert caught.value.code == "SESSION_NOT_FOUND"
        assert await app.unpair(second["session_id"]) == 1
        await no_more_events(bystander)


async def test_session_limit(start_service: StartService, peers: Peers) -> None:
    await start_service(pairing_max_sessions_per_runner=2)
    async with (
        peers.runner("r1") as runner,
        peers.app("a1") as a1,
        peers.app("a2") as a2,
        peers.app("a3") as a3,
    ):
        code = (await runner.request_code(max_uses=3))["code"]
        await a1.pair(code)
        await a2.pair(code)
        with pytest.raises(ReplyError) as caught:
            await a3.pair(code)
        assert caught.value.code == "SESSION_LIMIT_REACHED"
        # Re-pairing an app that is already paired does not count the replaced session.
        code2 = (await runner.request_code())["code"]
        await a1.pair(code2)
        assert len(await runner.sessions()) == 2
