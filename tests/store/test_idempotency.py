"""Idempotency of ops with effects (docs/protocol.md "Idempotency") and crashes between steps
of a pair (docs/design.md "A pair across slots")."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

from mqtt_pairing.dispatcher import payload_hash
from mqtt_pairing.errors import PairingErrorCode
from mqtt_pairing.models import error_reply
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.redis_store import Begin, Mismatch, Replay
from mqtt_pairing.topics import Kind
from tests.store.helpers import Api, error_code, failures_logged, new_id


async def test_pair_replay_same_reply_and_no_second_effect(api: Api) -> None:
    code = await api.code("r1", max_uses=3)
    first = await api.handle(Kind.APP, "a1", "pair", {"request_id": "p1", "code": code})
    assert first.reply is not None
    assert first.reply["ok"]
    assert first.events
    # the same request again, keys in another order: same reply, nothing happens
    again = await api.handle(Kind.APP, "a1", "pair", {"code": code, "request_id": "p1"})
    assert again.reply == first.reply
    assert again.events == []
    assert (await api.code_hash(code))["uses_left"] == "2"
    assert await api.runner_session_count("r1") == 1
    sessions = await api.request(Kind.APP, "a1", "sessions")
    assert len(sessions["result"]["sessions"]) == 1


async def test_pair_same_request_id_other_payload_is_invalid_request(api: Api) -> None:
    code = await api.code("r1", max_uses=3)
    assert (await api.pair("a1", code, request_id="p1"))["ok"]
    reply = await api.pair("a1", code, request_id="p1", app_name="other")
    assert error_code(reply) == "INVALID_REQUEST"
    assert reply["request_id"] == "p1"
    assert (await api.code_hash(code))["uses_left"] == "2"
    # the same request_id of another app or another op is another request
    assert (await api.pair("a2", code, request_id="p1"))["ok"]


async def test_a_replayed_failure_counts_once(api: Api) -> None:
    first = await api.pair("a1", "ZZZ-ZZZ-ZZZ", request_id="p1")
    assert error_code(first) == "CODE_NOT_FOUND"
    for _ in range(api.settings.pairing_fail_limit + 2):
        assert await api.pair("a1", "ZZZ-ZZZ-ZZZ", request_id="p1") == first
    assert await failures_logged(api.store, "app", "a1") == 1


async def test_replays_count_toward_no_limit(make_api: Callable[..., Api]) -> None:
    api = make_api(pairing_app_request_limit=2)
    code = await api.code("r1", max_uses=3)
    first = await api.pair("a1", code, request_id="p1")
    assert first["ok"]
    assert error_code(await api.pair("a1", "ZZZ-ZZZ-ZZZ", request_id="p2")) == "CODE_NOT_FOUND"
    for _ in range(3):
        assert await api.pair("a1", code, request_id="p1") == first
    assert error_code(await api.pair("a1", code, request_id="p3")) == "RATE_LIMITED"


async def test_code_replay_is_identical_and_stored_sealed(api: Api) -> None:
    payload = {"request_id": "c1", "ttl_s": 300, "max_uses": 2, "runner_name": "R"}
    first = await api.handle(Kind.RUNNER, "r1", "code", payload)
    assert first.reply is not None
    assert first.reply["ok"]
    code = first.reply["result"]["code"]
    again = await api.handle(Kind.RUNNER, "r1", "code", dict(reversed(payload.items())))
    assert again.reply == first.reply
    # no second code: the runner's active code and the code keys are unchanged
    client, keys = api.store.client, api.store.keys
    assert await client.hget(keys.runner("r1"), "code") == api.digest(code)
    assert len([k async for k in client.scan_iter(match=f"{keys.prefix}:code:*")]) == 1
    # the remembered reply is sealed: no code in it, in any form
    stored = await client.get(keys.dedupe("runner", "r1", "code", "c1"))
    state, _hash, _lease, reply = stored.split("\n", 3)
    assert state == "d"
    assert reply.startswith("v1.")
    dump = stored.upper()
    assert code not in dump
    assert code.replace("-", "") not in dump
    # another payload under the same request_id
    mismatch = await api.request(Kind.RUNNER, "r1", "code", request_id="c1", ttl_s=301)
    assert error_code(mismatch) == "INVALID_REQUEST"


async def test_cancel_code_replay(api: Api) -> None:
    await api.code("r1")
    first = await api.request(Kind.RUNNER, "r1", "cancel-code", request_id="k1")
    assert first["result"] == {"cancelled": True}
    assert await api.request(Kind.RUNNER, "r1", "cancel-code", request_id="k1") == first
    second = await api.request(Kind.RUNNER, "r1", "cancel-code", request_id="k2")
    assert second["result"] == {"cancelled": False}


async def test_unpair_replay(api: Api) -> None:
    code = await api.code("r1", max_uses=2)
    s1 = await api.pair_ok("a1", code)
    first = await api.request(Kind.APP, "a1", "unpair", request_id="u1", session_id=s1)
    assert first["result"] == {"closed": 1}
    assert await api.request(Kind.APP, "a1", "unpair", request_id="u1", session_id=s1) == first
    other = await api.request(Kind.APP, "a1", "unpair", request_id="u2", session_id=s1)
    assert error_code(other) == "SESSION_NOT_FOUND"


async def test_a_copy_arriving_while_the_first_is_handled_gets_the_same_reply(
    api: Api,
) -> None:
    code = await api.code("r1", max_uses=5)
    payload = {"request_id": "p1", "code": code}
    copies = await asyncio.gather(*(api.handle(Kind.APP, "a1", "pair", payload) for _ in range(5)))
    replies = [c.reply for c in copies]
    assert replies[0] is not None
    assert replies[0]["ok"]
    assert all(r == replies[0] for r in replies)
    assert await api.runner_session_count("r1") == 1
    assert (await api.code_hash(code))["uses_left"] == "4"


async def _begin_and_claim(
    api: Api, store: PairingStore, app_id: str, code: str, request_id: str, session_id: str
) -> None:
    """Steps 1 and 2 of a pair, as the dispatcher and services run them."""
    s = api.settings
    obj = {"request_id": request_id, "code": code}
    begun = await store.begin_request(
        "app",
        app_id,
        "pair",
        request_id,
        payload_hash(obj),
        lease_s=s.pairing_pending_lease_s,
        dedupe_ttl_s=s.pairing_dedupe_ttl_s,
        check_ban=True,
        check_penalty=True,
        request_limit=s.pairing_app_request_limit,
        request_window_s=s.pairing_app_request_window_s,
    )
    assert isinstance(begun, Begin)
    claim = await store.claim_code(api.digest(code), app_id, request_id, session_id)
    assert claim.session_id == session_id
    assert not claim.repeat


async def _end_lease(api: Api, app_id: str, request_id: str) -> None:
    """The crashed instance's pending lease runs out."""
    key = api.store.keys.dedupe("app", app_id, "pair", request_id)
    state, phash, _lease, reply = (await api.store.client.get(key)).split("\n", 3)
    assert state == "p"
    await api.store.client.set(key, f"p\n{phash}\n0\n{reply}", keepttl=True)


async def test_crash_after_claim_retry_ends_with_the_same_session(
    api: Api, store: PairingStore
) -> None:
    code = await api.code("r1", max_uses=3)
    session_id = str(uuid.uuid4())
    await _begin_and_claim(api, store, "a1", code, "p1", session_id)
    # crash: the session was never opened
    assert await api.runner_session_count("r1") == 0
    await _end_lease(api, "a1", "p1")
    reply = await api.pair("a1", code, request_id="p1")
    assert reply["ok"], reply
    assert reply["result"]["session"]["session_id"] == session_id
    assert (await api.code_hash(code))["uses_left"] == "2"  # one use, not two
    assert await api.runner_session_count("r1") == 1
    assert await store.app_session_runner("a1", session_id) == "r1"
    assert await store.find_session(session_id) == ("r1", "a1")
    assert await api.pair("a1", code, request_id="p1") == reply


async def test_crash_after_claim_a_redelivered_copy_waits_out_the_lease(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_pending_lease_s=1)
    code = await api.code("r1")
    session_id = str(uuid.uuid4())
    await _begin_and_claim(api, store, "a1", code, "p1", session_id)
    # the copy finds the request pending, waits for the lease (1 s) and takes it over
    reply = await api.pair("a1", code, request_id="p1")
    assert reply["ok"], reply
    assert reply["result"]["session"]["session_id"] == session_id
    assert await api.runner_session_count("r1") == 1


async def test_crash_after_open_session_retry_ends_with_the_same_session(
    api: Api, store: PairingStore
) -> None:
    code = await api.code("r1", max_uses=3)
    session_id = str(uuid.uuid4())
    await _begin_and_claim(api, store, "a1", code, "p1", session_id)
    opened = await store.open_session(
        digest=api.digest(code),
        session_id=session_id,
        runner_id="r1",
        app_id="a1",
        app_name=None,
        idle_ttl_s=api.settings.pairing_session_idle_ttl_s,
        max_sessions=api.settings.pairing_max_sessions_per_runner,
    )
    assert opened.session.session_id == session_id
    # crash: the app slot never finished (no index, no remembered reply)
    await _end_lease(api, "a1", "p1")
    reply = await api.pair("a1", code, request_id="p1")
    assert reply["ok"], reply
    assert reply["result"]["session"]["session_id"] == session_id
    assert await api.runner_session_count("r1") == 1
    assert (await api.code_hash(code))["uses_left"] == "2"
    assert await store.app_session_runner("a1", session_id) == "r1"
    sessions = await api.request(Kind.RUNNER, "r1", "sessions")
    assert [s["session_id"] for s in sessions["result"]["sessions"]] == [session_id]


async def test_crash_before_a_refused_use_was_given_back_retry_gives_it_back(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_max_sessions_per_runner=1)
    await api.pair_ok("a0", await api.code("r1"))
    code = await api.code("r1", max_uses=2)
    await _begin_and_claim(api, store, "a1", code, "p1", str(uuid.uuid4()))
    # crash after step 2; step 3 would have refused (the runner is full)
    assert (await api.code_hash(code))["uses_left"] == "1"
    await _end_lease(api, "a1", "p1")
    assert error_code(await api.pair("a1", code, request_id="p1")) == "SESSION_LIMIT_REACHED"
    assert (await api.code_hash(code))["uses_left"] == "2"
    assert await api.runner_session_count("r1") == 1


async def test_not_remembered_replies_are_handled_afresh(api: Api, store: PairingStore) -> None:
    code = await api.code("r1")
    await store.set_ban("app", "a1", reason="test", by="tests", duration_s=60)
    assert error_code(await api.pair("a1", code, request_id="p1")) == "BANNED"
    assert not await store.client.exists(store.keys.dedupe("app", "a1", "pair", "p1"))
    assert await store.remove_ban("app", "a1")
    assert (await api.pair("a1", code, request_id="p1"))["ok"]


async def test_the_dedupe_key_has_the_dedupe_ttl(api: Api) -> None:
    code = await api.code("r1", request_id="c1")
    await api.pair("a1", code, request_id=new_id())
    key = api.store.keys.dedupe("runner", "r1", "code", "c1")
    ttl_ms = api.settings.pairing_dedupe_ttl_s * 1000
    assert ttl_ms - 5_000 < await api.store.client.pttl(key) <= ttl_ms


async def test_a_copy_waiting_for_a_refused_first_copy_takes_no_use(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_max_sessions_per_runner=1)
    await api.pair_ok("a0", await api.code("r1"))  # the runner is full
    code = await api.code("r1", max_uses=2)
    digest = api.digest(code)
    # copy 1: steps 1-2, then step 3 refuses and step 4 gives the use back...
    await _begin_and_claim(api, store, "a1", code, "p1", str(uuid.uuid4()))
    assert await store.unclaim_code(digest, "a1", "p1")
    # ...while copy 2 (a QoS 1 redelivery) arrives and waits for it
    copy2 = asyncio.create_task(api.pair("a1", code, request_id="p1"))
    await asyncio.sleep(0.2)
    assert not copy2.done()
    # copy 1 remembers its refusal
    refusal = error_reply("p1", PairingErrorCode.SESSION_LIMIT_REACHED, "the runner is full")
    await store.finish_request(
        "app", "a1", "pair", "p1", reply=json.dumps(refusal), dedupe_ttl_s=600
    )
    assert await copy2 == refusal
    assert (await api.code_hash(code))["uses_left"] == "2"


async def test_a_record_made_once_keeps_its_ttl_and_one_outliving_it_gets_one(
    store: PairingStore,
) -> None:
    """The pending mark's SET sets the dedupe TTL once; remembering the reply keeps it. A
    request that outlived its record still leaves one with a TTL (real 1 s TTL)."""
    options = {"lease_s": 10, "check_ban": True, "check_penalty": True}
    key = store.keys.dedupe("app", "a1", "pair", "p1")
    begun = await store.begin_request(
        "app", "a1", "pair", "p1", "ab" * 32, dedupe_ttl_s=600, **options
    )
    assert isinstance(begun, Begin)
    assert begun.payload_hash == "ab" * 32
    first = await store.client.pttl(key)
    assert 590_000 < first <= 600_000
    await asyncio.sleep(0.05)
    await store.finish_request(
        "app",
        "a1",
        "pair",
        "p1",
        reply='{"ok": true}',
        dedupe_ttl_s=600,
        payload_hash=begun.payload_hash,
    )
    assert await store.client.pttl(key) <= first - 40
    replay = await store.begin_request(
        "app", "a1", "pair", "p1", "ab" * 32, dedupe_ttl_s=600, **options
    )
    assert replay == Replay(reply='{"ok": true}')
    mismatch = await store.begin_request(
        "app", "a1", "pair", "p1", "cd" * 32, dedupe_ttl_s=600, **options
    )
    assert isinstance(mismatch, Mismatch)

    key = store.keys.dedupe("app", "a1", "pair", "p2")
    begun = await store.begin_request(
        "app", "a1", "pair", "p2", "ab" * 32, dedupe_ttl_s=1, **options
    )
    await asyncio.sleep(1.1)
    assert not await store.client.exists(key)
    await store.finish_request("app", "a1", "pair", "p2", reply='{"ok": false}', dedupe_ttl_s=1)
    assert 0 < await store.client.pttl(key) <= 1_000


async def test_records_of_the_earlier_hash_form_are_read_after_an_upgrade(api: Api) -> None:
    """Dedupe records written before they became strings (a hash: h, st, lease, reply)
    still answer a retry within their TTL: the remembered reply, a mismatch, or a takeover."""
    code = await api.code("r1", max_uses=3)
    first = await api.handle(Kind.APP, "a1", "pair", {"request_id": "p1", "code": code})
    assert first.reply is not None
    assert first.reply["ok"]
    key = api.store.keys.dedupe("app", "a1", "pair", "p1")
    phash = (await api.store.client.get(key)).split("\n", 3)[1]
    await api.store.client.delete(key)
    await api.store.client.hset(
        key, mapping={"h": phash, "st": "done", "lease": "0", "reply": json.dumps(first.reply)}
    )
    await api.store.client.pexpire(key, 120_000)
    again = await api.handle(Kind.APP, "a1", "pair", {"request_id": "p1", "code": code})
    assert again.reply == first.reply
    assert (await api.code_hash(code))["uses_left"] == "2"
    assert 0 < await api.store.client.pttl(key) <= 120_000  # now a string, same TTL
    assert (await api.store.client.get(key)).startswith("d\n")
    # another payload under an old record is still a mismatch
    other = api.store.keys.dedupe("app", "a1", "pair", "p2")
    await api.store.client.hset(other, mapping={"h": "0" * 64, "st": "done", "reply": "{}"})
    await api.store.client.pexpire(other, 60_000)
    reply = await api.pair("a1", code, request_id="p2")
    assert error_code(reply) == "INVALID_REQUEST"
    # a pending one whose lease ran out is taken over
    pending = api.store.keys.dedupe("app", "a2", "pair", "p3")
    payload = {"request_id": "p3", "code": code}
    await api.store.client.hset(
        pending,
        mapping={"h": payload_hash(payload), "st": "pending", "lease": "1"},
    )
    await api.store.client.pexpire(pending, 60_000)
    taken = await api.handle(Kind.APP, "a2", "pair", payload)
    assert taken.reply is not None
    assert taken.reply["ok"], taken.reply
