"""The `message` op (docs/protocol.md, "Runner and app message"): relayed to the other party
of an active session as `session.message`, checked against the session, nothing written."""

from __future__ import annotations

from collections.abc import Callable

from mqtt_pairing.topics import Kind
from tests.harness.api import Api
from tests.store.helpers import all_keys, dump_key, error_code


async def snapshot(api: Api) -> list[str]:
    prefix = api.store.keys.prefix
    return [
        await dump_key(api.store.client, key) for key in await all_keys(api.store.client, prefix)
    ]


async def test_each_party_reaches_the_other(api: Api) -> None:
    session_id = await api.paired("r1", "a1")
    for sender, ident, to, to_id in (
        (Kind.RUNNER, "r1", Kind.APP, "a1"),
        (Kind.APP, "a1", Kind.RUNNER, "r1"),
    ):
        payload = {"request_id": f"m-{ident}", "session_id": session_id, "data": {"n": 1}}
        handled = await api.handle(sender, ident, "message", payload)
        assert handled.reply == {"request_id": f"m-{ident}", "ok": True, "result": {"sent": True}}
        assert handled.outbox == []
        (event,) = handled.events
        assert (event.kind, event.id) == (to, to_id)
        assert event.payload["event"] == "session.message"
        assert event.payload["session_id"] == session_id
        assert event.payload["from"] == sender.value
        assert event.payload["data"] == {"n": 1}
        # A repeat carries the same event id (the receiver drops the copy); another
        # request another one.
        again = await api.handle(sender, ident, "message", payload)
        assert again.events[0].payload["event_id"] == event.payload["event_id"]
        other = await api.handle(sender, ident, "message", {**payload, "request_id": "x"})
        assert other.events[0].payload["event_id"] != event.payload["event_id"]
        # The same request_id with other data is another message, not a copy; the same
        # data with its keys in another order is the same message.
        changed = await api.handle(sender, ident, "message", {**payload, "data": {"n": 2}})
        assert changed.reply == handled.reply
        assert changed.events[0].payload["data"] == {"n": 2}
        assert changed.events[0].payload["event_id"] != event.payload["event_id"]
        two = {**payload, "data": {"a": 1, "b": [1, "é"]}}
        first = await api.handle(sender, ident, "message", two)
        reordered = await api.handle(
            sender, ident, "message", {**two, "data": {"b": [1, "é"], "a": 1}}
        )
        assert first.events[0].payload["event_id"] == reordered.events[0].payload["event_id"]


async def test_only_the_parties_of_an_active_session(api: Api) -> None:
    session_id = await api.paired("r1", "a1")
    await api.paired("r2", "a2")
    for kind, ident, sid in (
        (Kind.RUNNER, "r2", session_id),  # another runner
        (Kind.APP, "a2", session_id),  # another app
        (Kind.RUNNER, "r1", "no-such-session"),
        (Kind.APP, "a1", "no-such-session"),
    ):
        reply = await api.request(kind, ident, "message", session_id=sid, data={})
        assert error_code(reply) == "SESSION_NOT_FOUND", (kind, ident, sid)
    assert (await api.request(Kind.APP, "a1", "unpair", session_id=session_id))["ok"]
    for kind, ident in ((Kind.RUNNER, "r1"), (Kind.APP, "a1")):
        reply = await api.request(kind, ident, "message", session_id=session_id, data={})
        assert error_code(reply) == "SESSION_NOT_FOUND"


async def test_nothing_is_written(api: Api) -> None:
    session_id = await api.paired("r1", "a1")
    before = await snapshot(api)
    for kind, ident in ((Kind.RUNNER, "r1"), (Kind.APP, "a1"), (Kind.APP, "a2")):
        await api.request(kind, ident, "message", session_id=session_id, data={"x": "y"})
    assert await snapshot(api) == before


async def test_bounded_data(api: Api) -> None:
    session_id = await api.paired("r1", "a1")
    for data in ({"x": "y" * 1020}, [1], "text", None):
        reply = await api.request(Kind.APP, "a1", "message", session_id=session_id, data=data)
        assert error_code(reply) == "INVALID_REQUEST", data
    reply = await api.request(Kind.APP, "a1", "message", session_id=session_id)
    assert error_code(reply) == "INVALID_REQUEST"


async def test_rate_limited_per_sender(make_api: Callable[..., Api]) -> None:
    api = make_api(pairing_message_limit=2, pairing_message_window_s=60)
    session_id = await api.paired("r1", "a1")
    for _ in range(2):
        assert (await api.request(Kind.APP, "a1", "message", session_id=session_id, data={}))["ok"]
    reply = await api.request(Kind.APP, "a1", "message", session_id=session_id, data={})
    assert error_code(reply) == "RATE_LIMITED"
    assert 1 <= reply["error"]["retry_after_s"] <= 60
    # The runner has a count of its own.
    assert (await api.request(Kind.RUNNER, "r1", "message", session_id=session_id, data={}))["ok"]
