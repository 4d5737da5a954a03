"""End to end on real Mosquitto + Redis: the pair flow, single use, wrong codes, 3.1.1."""

from __future__ import annotations

import time
from typing import Any, Literal

import pytest

from mqtt_pairing.client import ReplyError
from tests.service.support import (
    CODE_RE,
    Peers,
    RunningService,
    Sniffer,
    by_event,
    check_event_envelope,
    events,
    no_more_events,
    parse_ts,
)

RUNNER_METADATA: dict[str, Any] = {
    "os": "linux",
    "arch": "arm64",
    "tags": ["ci", "ünïcødé"],
    "n": {"x": [1, 2]},
}
RUNNER_KEY = "ed25519:runner-" + "R" * 40
APP_METADATA: dict[str, Any] = {"device": "Pixel 9", "locale": "de-CH", "empty": {}, "nil": None}
APP_KEY = "x25519:app-" + "A" * 40


def check_session(session: dict[str, Any], *, runner_id: str, app_id: str) -> None:
    assert isinstance(session["session_id"], str)
    assert session["session_id"]
    assert session["runner_id"] == runner_id
    assert session["app_id"] == app_id
    assert session["state"] == "active"
    assert "closed_reason" not in session or session["closed_reason"] is None
    created = parse_ts(session["created_at"])
    assert parse_ts(session["last_seen_at"]) >= created
    assert abs(created.timestamp() - time.time()) < 60


async def test_full_pair_flow(running_service: RunningService, peers: Peers) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        result = await runner.request_code(
            runner_name="build box 7", metadata=RUNNER_METADATA, public_key=RUNNER_KEY
        )
        code = result["code"]
        assert CODE_RE.fullmatch(code), code
        assert result["ttl_s"] == 600
        assert result["max_uses"] == 1
        expires = parse_ts(result["expires_at"])
        assert 590 < expires.timestamp() - time.time() < 610
        assert result["pairing_uri"] == (
            f"mqtt-pairing://pair?code={code.replace('-', '')}&runner=r1"
        )

        typed = code.lower().replace("-", " ")
        paired = await app.pair(
            typed, app_name="Ana's phone", metadata=APP_METADATA, public_key=APP_KEY
        )
        session = paired["session"]
        check_session(session, runner_id="r1", app_id="a1")
        assert session["runner_name"] == "build box 7"
        assert session["app_name"] == "Ana's phone"
        assert paired["runner_public_key"] == RUNNER_KEY
        assert paired["runner_metadata"] == RUNNER_METADATA

        runner_events = by_event(await events(runner, 2))
        assert set(runner_events) == {"session.opened", "code.used"}
        opened = runner_events["session.opened"][0]
        check_event_envelope(opened)
        assert opened["session"] == session
        assert opened["app_public_key"] == APP_KEY
        assert opened["app_metadata"] == APP_METADATA
        used = runner_events["code.used"][0]
        check_event_envelope(used)
        assert used["uses_left"] == 0

        (app_opened,) = await events(app, 1)
        check_event_envelope(app_opened)
        assert app_opened["event"] == "session.opened"
        assert app_opened["session"] == session
        assert used["event_id"] != opened["event_id"]
        await no_more_events(runner)
        await no_more_events(app)

        # Both sides list the session.
        assert [s["session_id"] for s in await runner.sessions()] == [session["session_id"]]
        assert [s["session_id"] for s in await app.sessions()] == [session["session_id"]]
        status = await app.status()
        assert status["paired"] is True
        assert [r["runner_id"] for r in status["runners"]] == ["r1"]
        assert status["runners"][0]["session_id"] == session["session_id"]


async def test_pair_without_metadata_relays_nulls(
    running_service: RunningService, peers: Peers
) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code(unknown_field={"ignored": True}))["code"]
        paired = await app.pair(code, unknown_field=[1, 2], another=None)
        assert paired["runner_public_key"] is None
        assert paired["runner_metadata"] is None
        opened = by_event(await events(runner, 2))["session.opened"][0]
        assert opened["app_public_key"] is None
        assert opened["app_metadata"] is None


async def test_code_is_single_use(running_service: RunningService, peers: Peers) -> None:
    async with (
        peers.runner("r1") as runner,
        peers.app("a1") as first,
        peers.app("a2") as second,
    ):
        code = (await runner.request_code())["code"]
        await first.pair(code)
        with pytest.raises(ReplyError) as caught:
            await second.pair(code)
        assert caught.value.code == "CODE_ALREADY_USED"
        assert code.replace("-", "") not in caught.value.message
        assert code not in caught.value.message
        # The runner heard of one pairing only.
        runner_events = by_event(await events(runner, 2))
        assert len(runner_events["session.opened"]) == 1
        await no_more_events(runner)
        assert len(await runner.sessions()) == 1
        assert await second.sessions() == []


async def test_wrong_and_malformed_codes(running_service: RunningService, peers: Peers) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code())["code"]
        # A well-formed code that differs in its last character.
        last = code[-1]
        wrong = code[:-1] + ("0" if last != "0" else "1")
        with pytest.raises(ReplyError) as caught:
            await app.pair(wrong)
        assert caught.value.code == "CODE_NOT_FOUND"
        assert wrong.replace("-", "") not in caught.value.message
        for bad in ("abc", "ABC-DEF-GHU", "ABCD-EFG-HJKM", ""):
            with pytest.raises(ReplyError) as caught:
                await app.pair(bad)
            assert caught.value.code == "INVALID_FORMAT", bad
        # The runner's code is still good: the failures did not consume it.
        await app.pair(code)


async def test_replaced_code_is_already_used(running_service: RunningService, peers: Peers) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        old = (await runner.request_code())["code"]
        new = (await runner.request_code())["code"]
        assert new != old
        with pytest.raises(ReplyError) as caught:
            await app.pair(old)
        assert caught.value.code == "CODE_ALREADY_USED"
        await app.pair(new)


@pytest.mark.parametrize(
    ("runner_protocol", "app_protocol"), [("3.1.1", "3.1.1"), ("5", "3.1.1"), ("3.1.1", "5")]
)
async def test_mqtt_311_clients_pair(
    running_service: RunningService,
    peers: Peers,
    runner_protocol: Literal["5", "3.1.1"],
    app_protocol: Literal["5", "3.1.1"],
) -> None:
    async with (
        peers.runner("r1", protocol=runner_protocol) as runner,
        peers.app("a1", protocol=app_protocol) as app,
    ):
        code = (await runner.request_code(metadata={"k": "v"}))["code"]
        paired = await app.pair(code)
        assert paired["runner_metadata"] == {"k": "v"}
        runner_events = by_event(await events(runner, 2))
        assert runner_events["session.opened"][0]["session"] == paired["session"]
        (app_opened,) = await events(app, 1)
        assert app_opened["session"] == paired["session"]
        assert await app.unpair(paired["session"]["session_id"]) == 1


async def test_code_bounds_are_clamped(running_service: RunningService, peers: Peers) -> None:
    async with peers.runner("r1") as runner:
        low = await runner.request_code(ttl_s=5, max_uses=0)
        assert (low["ttl_s"], low["max_uses"]) == (60, 1)
        high = await runner.request_code(ttl_s=10**7, max_uses=99)
        assert (high["ttl_s"], high["max_uses"]) == (86_400, 10)
        bad: dict[str, Any]
        for bad in ({"ttl_s": 120.0}, {"ttl_s": True}, {"max_uses": "2"}, {"metadata": []}):
            with pytest.raises(ReplyError) as caught:
                await runner.request_code(**bad)
            assert caught.value.code == "INVALID_REQUEST", bad


async def test_heartbeat_has_no_reply_unless_it_fails(
    running_service: RunningService, peers: Peers, sniffer: Sniffer
) -> None:
    reply_topic = f"{peers.prefix}/runners/r1/res/heartbeat"
    async with peers.runner("r1") as runner:
        await runner.heartbeat()
        await runner.publish_raw("heartbeat", b'{"request_id": "hb-1"}')
        await runner.publish_raw("heartbeat", b"[]")
        failed = (await sniffer.next(reply_topic)).json()
        assert failed["error"]["code"] == "INVALID_REQUEST"
        await runner.sessions()  # everything before it has been handled
        assert len(sniffer.on(reply_topic)) == 1


async def test_code_pasted_with_fullwidth_forms_and_dashes(
    running_service: RunningService, peers: Peers
) -> None:
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        code = (await runner.request_code())["code"]
        # Full-width forms (NFKC), an en dash, a no-break space and a soft hyphen.
        fullwidth = "".join(chr(ord(c) + 0xFEE0) if c != "-" else "\u2013" for c in code)
        pasted = "\u00a0" + fullwidth[:5] + "\u00ad" + fullwidth[5:] + " "
        paired = await app.pair(pasted)
        assert paired["session"]["runner_id"] == "r1"
