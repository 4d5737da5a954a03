"""Codes in the store: replace, cancel, expiry vs not found (docs/protocol.md "Codes")."""

from __future__ import annotations

from collections.abc import Callable

from mqtt_pairing.codes import code_group
from mqtt_pairing.store import PairingStore
from mqtt_pairing.tombstones import RECORD_BYTES
from mqtt_pairing.topics import Kind
from tests.harness.waiting import aredis_ms, wait_redis_time, wait_until
from tests.store.helpers import Api, all_keys, error_code, redis_now_ms


async def test_a_new_code_replaces_the_old_one_at_once(api: Api) -> None:
    old = await api.code("r1", max_uses=3)
    new = await api.code("r1")
    assert old != new
    assert error_code(await api.pair("a1", old)) == "CODE_ALREADY_USED"
    assert (await api.code_hash(old))["state"] == "replaced"
    await api.pair_ok("a2", new)
    runner = await api.store.client.hgetall(api.store.keys.runner("r1"))
    assert runner["code"] == api.digest(new)


async def test_cancel_code(api: Api) -> None:
    code = await api.code("r1")
    reply = await api.request(Kind.RUNNER, "r1", "cancel-code")
    assert reply["ok"]
    assert reply["result"] == {"cancelled": True}
    assert error_code(await api.pair("a1", code)) == "CODE_ALREADY_USED"
    assert (await api.code_hash(code))["state"] == "cancelled"
    reply = await api.request(Kind.RUNNER, "r1", "cancel-code")
    assert reply["result"] == {"cancelled": False}


async def test_cancel_without_any_code(api: Api) -> None:
    reply = await api.request(Kind.RUNNER, "r1", "cancel-code")
    assert reply["result"] == {"cancelled": False}


async def test_cancel_after_the_code_was_used_up(api: Api) -> None:
    code = await api.code("r1")
    await api.pair_ok("a1", code)
    reply = await api.request(Kind.RUNNER, "r1", "cancel-code")
    assert reply["result"] == {"cancelled": False}
    assert (await api.code_hash(code))["state"] == "used"


async def test_a_claim_in_flight_does_not_open_after_its_code_was_replaced(
    api: Api, store: PairingStore
) -> None:
    # docs/design.md "A pair across slots", step 3: the session opens only if the code is
    # still the runner's active code; the use is given back (step 4) and the app is told
    # CODE_ALREADY_USED.
    old = await api.code("r1", max_uses=2)
    claim = await store.claim_code(api.digest(old), "a1", "req-1", "session-1")
    assert claim.uses_left == 1
    await api.code("r1")  # replaces `old` between step 2 and step 3
    reply = await api.pair("a1", old, request_id="req-1")
    assert error_code(reply) == "CODE_ALREADY_USED"
    assert await api.runner_session_count("r1") == 0


async def _rewrite_tombstone(api: Api, code: str, expires_ms: int) -> None:
    """Replace the code's tombstone record with one for an expiry at `expires_ms`."""
    layout, store, digest = api.settings.tombstones, api.store, api.digest(code)
    for window in layout.lookup_windows(expires_ms, skew_ms=10 * layout.window_ms):
        await store.client.delete(
            store.keys.tombstones(code_group(digest), window, layout.bucket(digest))
        )
    await store.call(store.tombstone_call(layout, digest, expires_ms))


async def test_expired_then_not_found_without_sleeping(api: Api) -> None:
    s = api.settings
    code = await api.code("r1", ttl_s=120)
    key = api.store.keys.code(api.digest(code))
    client = api.store.client
    # the code hash lives as long as the code (docs/design.md "Redis keys"); its tombstone
    # record is written with it, in the string of its shard and expiry window
    pttl = await client.pttl(key)
    assert 115_000 < pttl <= 120_000
    expires = int((await api.code_hash(code))["expires_ms"])
    place = s.tombstones.place(api.digest(code), expires)
    tomb_key = api.store.keys.tombstones(place.group, place.window, place.bucket)
    assert await client.strlen(tomb_key) == RECORD_BYTES
    assert await client.pexpiretime(tomb_key) == place.expire_at_ms
    # the code's time runs out while its hash is still there
    await client.hset(key, "e", await redis_now_ms(client) - 1)
    assert error_code(await api.pair("a1", code)) == "CODE_EXPIRED"
    # the hash is gone: the tombstone record answers, in any spelling of the code
    await client.delete(key)
    assert error_code(await api.pair("a2", code)) == "CODE_NOT_FOUND"  # expiry still ahead
    await _rewrite_tombstone(api, code, await redis_now_ms(client) - 1_000)
    assert error_code(await api.pair("a3", code)) == "CODE_EXPIRED"
    assert error_code(await api.pair("a4", code.replace("-", "").lower())) == "CODE_EXPIRED"
    # the tombstone time passes
    await _rewrite_tombstone(
        api, code, await redis_now_ms(client) - s.pairing_code_tombstone_s * 1000 - 1_000
    )
    assert error_code(await api.pair("a5", code)) == "CODE_NOT_FOUND"


async def test_without_tombstones_an_expired_code_is_not_found(
    make_api: Callable[..., Api],
) -> None:
    api = make_api(pairing_code_tombstone_s=0)
    code = await api.code("r1")
    client = api.store.client
    assert not [k for k in await all_keys(client, api.store.keys.prefix) if ":tomb:" in k]
    await client.hset(api.store.keys.code(api.digest(code)), "e", await redis_now_ms(client) - 1)
    assert error_code(await api.pair("a1", code)) == "CODE_EXPIRED"
    await client.delete(api.store.keys.code(api.digest(code)))
    assert error_code(await api.pair("a2", code)) == "CODE_NOT_FOUND"


async def test_expired_wins_over_used_and_cancelled(api: Api) -> None:
    client = api.store.client
    used = await api.code("r1")
    await api.pair_ok("a1", used)
    cancelled = await api.code("r2")
    assert (await api.request(Kind.RUNNER, "r2", "cancel-code"))["ok"]
    now = await redis_now_ms(client)
    for code in (used, cancelled):
        key = api.store.keys.code(api.digest(code))
        await client.hset(key, "e", now - 1)
        assert error_code(await api.pair("a9", code)) == "CODE_EXPIRED"


TOMBSTONE_S = 2


async def test_expired_then_not_found_in_real_time(make_api: Callable[..., Api]) -> None:
    """The same with real clocks (Redis TTLs, fakeredis's too): the code lives 1 s and its
    tombstone 2 s. The test follows Redis's clock, not sleeps: CODE_EXPIRED once the code's
    deadline has passed, then CODE_NOT_FOUND, and never before the tombstone's end."""
    api = make_api(pairing_code_ttl_min_s=1, pairing_code_tombstone_s=TOMBSTONE_S)
    client = api.store.client
    code = await api.code("r1", ttl_s=1)
    expires_ms = int((await api.code_hash(code))["expires_ms"])
    assert error_code(await api.pair("a0", "ZZZ-ZZZ-ZZZ")) == "CODE_NOT_FOUND"
    await wait_redis_time(client, expires_ms, "the code's deadline")

    answers: list[tuple[str | None, int]] = []

    async def not_found() -> bool:
        answer = error_code(await api.pair(f"a{len(answers) + 1}", code))
        answers.append((answer, await aredis_ms(client)))
        return answer == "CODE_NOT_FOUND"

    await wait_until(not_found, TOMBSTONE_S + 15, "CODE_NOT_FOUND", interval_s=0.05)
    *expired, (_, not_found_by_ms) = answers
    assert expired, "CODE_NOT_FOUND right after the deadline: no tombstone"
    assert {answer for answer, _ in expired} == {"CODE_EXPIRED"}, answers
    assert not_found_by_ms >= expires_ms + TOMBSTONE_S * 1000, "the tombstone ended early"


async def test_an_expired_code_is_not_live_for_cancel(make_api: Callable[..., Api]) -> None:
    # Real time, no backdating: the runner's slot keeps the code's deadline too, and a
    # cancel is answered from there (store.cancel_code).
    api = make_api(pairing_code_ttl_min_s=1)
    code = await api.code("r1", ttl_s=1)
    client = api.store.client
    await wait_redis_time(client, await api.expires_ms(code), "the code's deadline")
    reply = await api.request(Kind.RUNNER, "r1", "cancel-code")
    assert reply["result"] == {"cancelled": False}
