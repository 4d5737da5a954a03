"""Limits, penalties, the global budget and bans (docs/protocol.md "Default limits")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mqtt_pairing.store import PairingStore
from mqtt_pairing.topics import Kind
from tests.store.helpers import Api, error_code, failures_logged, redis_now_ms

WRONG = "ZZZ-ZZZ-ZZZ"


def _penalty_api(make_api: Callable[..., Api], **overrides: Any) -> Api:
    settings: dict[str, Any] = {
        "pairing_penalty_s": 2,
        "pairing_penalty_max_s": 5,
        "pairing_app_request_limit": 1000,
    }
    settings.update(overrides)
    return make_api(**settings)


async def _fail(api: Api, app_id: str, times: int) -> None:
    for _ in range(times):
        assert error_code(await api.pair(app_id, WRONG)) == "CODE_NOT_FOUND"


async def _lift_penalty(api: Api, app_id: str) -> None:
    """The penalty runs out (its memory, the strikes, stays)."""
    key = api.store.keys.limit("app", app_id)
    await api.store.client.hset(key, "penalty_until_ms", 0)


def _retry_after(reply: dict[str, Any]) -> int | None:
    assert error_code(reply) == "RATE_LIMITED", reply
    value: int | None = reply["error"].get("retry_after_s")
    return value


async def test_penalty_after_the_fail_limit_doubling_and_capped(
    make_api: Callable[..., Api],
) -> None:
    api = _penalty_api(make_api)
    limit = api.settings.pairing_fail_limit
    assert limit == 5
    await _fail(api, "a1", limit)
    sixth = await api.pair("a1", WRONG, request_id="sixth")
    assert _retry_after(sixth) == 2
    # RATE_LIMITED is not remembered: the same request after the penalty is handled
    await _lift_penalty(api, "a1")
    assert error_code(await api.pair("a1", WRONG, request_id="sixth")) == "CODE_NOT_FOUND"
    await _fail(api, "a1", limit - 1)
    assert _retry_after(await api.pair("a1", WRONG)) == 4  # doubled
    await _lift_penalty(api, "a1")
    await _fail(api, "a1", limit)
    assert _retry_after(await api.pair("a1", WRONG)) == 5  # 8, capped at the max
    await _lift_penalty(api, "a1")
    await _fail(api, "a1", limit)
    assert _retry_after(await api.pair("a1", WRONG)) == 5
    strikes = await api.store.client.hget(api.store.keys.limit("app", "a1"), "strikes")
    assert strikes == "4"


async def test_a_penalty_blocks_even_a_valid_code_and_runs_out(
    make_api: Callable[..., Api],
) -> None:
    api = _penalty_api(make_api, pairing_penalty_s=1)
    code = await api.code("r1")
    await _fail(api, "a1", api.settings.pairing_fail_limit)
    assert _retry_after(await api.pair("a1", code)) == 1
    assert (await api.code_hash(code))["uses_left"] == "1"
    # other apps are not affected
    await _fail(api, "a2", 1)
    # after the penalty (its real length, from Redis time)
    key = api.store.keys.limit("app", "a1")
    until = int(await api.store.client.hget(key, "penalty_until_ms"))
    await api.store.client.hset(key, "penalty_until_ms", until - 1000)
    await api.pair_ok("a1", code)


async def test_penalty_memory_runs_out_and_the_doubling_restarts(
    make_api: Callable[..., Api],
) -> None:
    api = _penalty_api(make_api)
    await _fail(api, "a1", 5)
    assert _retry_after(await api.pair("a1", WRONG)) == 2
    # a day without a penalty: the last penalty ended longer ago than the memory
    key = api.store.keys.limit("app", "a1")
    await api.store.client.hset(key, mapping={"penalty_until_ms": 0, "last_penalty_end_ms": 1})
    await _fail(api, "a1", 5)
    assert _retry_after(await api.pair("a1", WRONG)) == 2


async def test_allowlisted_app_gets_no_automatic_penalty(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = _penalty_api(make_api)
    await store.set_allowed("app", "vip", True)
    await _fail(api, "vip", 3 * api.settings.pairing_fail_limit)
    assert await store.client.hget(store.keys.limit("app", "vip"), "strikes") is None
    assert await failures_logged(store, "app", "vip") == 0
    # off the allowlist, failures count again
    await store.set_allowed("app", "vip", False)
    await _fail(api, "vip", api.settings.pairing_fail_limit)
    assert _retry_after(await api.pair("vip", WRONG)) == 2


async def test_allowlisted_app_is_still_banned_and_held_by_the_budget(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_global_fail_limit=3)
    await store.set_allowed("app", "vip", True)
    await _fail(api, "vip", 3)
    assert _retry_after(await api.pair("vip", WRONG)) is not None
    await store.set_ban("app", "vip", reason="test", by="tests", duration_s=None)
    assert error_code(await api.pair("vip", WRONG)) == "BANNED"


async def test_a_success_clears_the_failure_window_but_not_the_doubling(
    make_api: Callable[..., Api],
) -> None:
    api = _penalty_api(make_api)
    limit = api.settings.pairing_fail_limit
    await _fail(api, "a1", limit - 1)
    await api.pair_ok("a1", await api.code("r1"))
    assert await failures_logged(api.store, "app", "a1") == 0
    await _fail(api, "a1", limit - 1)
    await api.pair_ok("a1", await api.code("r2"))  # not limited
    # the doubling stays: a penalty, a success, then another penalty is doubled
    await _fail(api, "a1", limit)
    assert _retry_after(await api.pair("a1", WRONG)) == 2
    await _lift_penalty(api, "a1")
    await api.pair_ok("a1", await api.code("r3"))
    await _fail(api, "a1", limit)
    assert _retry_after(await api.pair("a1", WRONG)) == 4


async def test_app_request_rate(make_api: Callable[..., Api]) -> None:
    api = make_api(pairing_app_request_limit=3, pairing_app_request_window_s=30)
    code = await api.code("r1")
    # INVALID_FORMAT and failures count toward the request rate
    assert error_code(await api.pair("a1", "nope")) == "INVALID_FORMAT"
    assert error_code(await api.pair("a1", WRONG)) == "CODE_NOT_FOUND"
    await api.pair_ok("a1", code)
    retry = _retry_after(await api.pair("a1", code))
    assert retry is not None
    assert 1 <= retry <= 30
    # another app has its own rate
    assert error_code(await api.pair("a2", WRONG)) == "CODE_NOT_FOUND"
    # other ops of the app are not limited by it
    assert (await api.request(Kind.APP, "a1", "sessions"))["ok"]


async def test_runner_code_rate(make_api: Callable[..., Api]) -> None:
    api = make_api(pairing_runner_code_limit=2, pairing_runner_code_window_s=30)
    await api.code("r1", request_id="c1")
    await api.code("r1", request_id="c2")
    reply = await api.request(Kind.RUNNER, "r1", "code", request_id="c3")
    retry = _retry_after(reply)
    assert retry is not None
    assert 1 <= retry <= 30
    # a replay is answered, another runner is not limited
    assert (await api.request(Kind.RUNNER, "r1", "code", request_id="c1"))["ok"]
    await api.code("r2")


async def test_global_budget_holds_everyone_including_a_valid_code(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_global_fail_limit=5, pairing_global_fail_window_s=30)
    code = await api.code("r1")
    for i in range(5):
        assert error_code(await api.pair(f"guesser{i}", WRONG)) == "CODE_NOT_FOUND"
    for app_id, guess in (("innocent", code), ("guesser0", code), ("other", "bad")):
        retry = _retry_after(await api.pair(app_id, guess))
        assert retry is not None
        assert 1 <= retry <= 30
    assert (await api.code_hash(code))["uses_left"] == "1"
    # no app was penalised by the budget, and no failure was counted for it
    assert await failures_logged(store, "app", "innocent") == 0


async def test_a_success_gives_its_budget_unit_back(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_global_fail_limit=3)
    budget = store.keys.budget(0)
    await _fail(api, "g1", 1)
    await _fail(api, "g2", 1)
    assert await store.client.zcard(budget) == 2
    await api.pair_ok("a1", await api.code("r1"))
    assert await store.client.zcard(budget) == 2
    # refused at the session limit: no failed guess, the unit comes back too
    limited = make_api(pairing_global_fail_limit=3, pairing_max_sessions_per_runner=1)
    assert error_code(await limited.pair("a2", await limited.code("r1"))) == (
        "SESSION_LIMIT_REACHED"
    )
    assert await store.client.zcard(budget) == 2
    await _fail(api, "g3", 1)
    assert _retry_after(await api.pair("a3", await api.code("r2"))) is not None


async def test_admin_ban_of_an_app(api: Api, store: PairingStore) -> None:
    code = await api.code("r1")
    await store.set_ban("app", "a1", reason="abuse", by="tests", duration_s=120)
    reply = await api.pair("a1", code)
    assert error_code(reply) == "BANNED"
    assert reply["error"]["retry_after_s"] == 120
    # a ban is no failed guess
    assert await failures_logged(store, "app", "a1") == 0
    await store.set_ban("app", "a1", reason="abuse", by="tests", duration_s=None)
    reply = await api.pair("a1", code)
    assert error_code(reply) == "BANNED"
    assert "retry_after_s" not in reply["error"]
    assert await store.remove_ban("app", "a1")
    assert not await store.remove_ban("app", "a1")
    await api.pair_ok("a1", code)


async def test_admin_ban_of_a_runner_cancels_its_code(api: Api, store: PairingStore) -> None:
    code = await api.code("r1", max_uses=2)
    await store.set_ban("runner", "r1", reason="abuse", by="tests", duration_s=300)
    assert (await api.code_hash(code))["state"] == "cancelled"
    assert await store.client.hget(store.keys.runner("r1"), "code") is None
    assert error_code(await api.pair("a1", code)) == "CODE_ALREADY_USED"
    reply = await api.request(Kind.RUNNER, "r1", "code")
    assert error_code(reply) == "BANNED"
    assert reply["error"]["retry_after_s"] == 300
    await store.set_ban("runner", "r1", reason="abuse", by="tests", duration_s=None)
    reply = await api.request(Kind.RUNNER, "r1", "code")
    assert error_code(reply) == "BANNED"
    assert "retry_after_s" not in reply["error"]
    await store.remove_ban("runner", "r1")
    await api.pair_ok("a1", await api.code("r1"))


async def test_requests_refused_by_the_app_slot_spend_no_budget(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = _penalty_api(make_api, pairing_global_fail_limit=8)
    budget = store.keys.budget(0)
    await _fail(api, "guesser", api.settings.pairing_fail_limit)  # 5 units, and a penalty
    assert await store.client.zcard(budget) == 5
    # refused before the lookup: an admin ban, an automatic penalty
    await store.set_ban("app", "banned", reason="test", by="tests", duration_s=None)
    for _ in range(2):
        assert error_code(await api.pair("banned", WRONG)) == "BANNED"
        assert error_code(await api.pair("guesser", WRONG)) == "RATE_LIMITED"
    assert await store.client.zcard(budget) == 5
    # docs/protocol.md: a guess reserves a unit "before the lookup"; none of these got there
    for i in range(3):
        assert error_code(await api.pair(f"innocent{i}", WRONG)) == "CODE_NOT_FOUND"


async def test_the_limit_hash_outlives_its_request_log(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    """The request log lives in the limit hash: the hash lasts at least the window after the
    last counted request, so the rate holds across it (real 1 s window)."""
    api = make_api(
        pairing_app_request_limit=2, pairing_app_request_window_s=1, pairing_fail_window_s=1
    )
    key = store.keys.limit("app", "a1")
    await _fail(api, "a1", 1)
    assert 1_000 - 100 < await store.client.pttl(key) <= 2_000
    await _fail(api, "a1", 1)
    assert _retry_after(await api.pair("a1", WRONG)) == 1
    await asyncio.sleep(1.1)
    assert error_code(await api.pair("a1", WRONG)) == "CODE_NOT_FOUND"
    # the log holds only what is in the window (and never more than the limit)
    assert len((await store.client.hget(key, "rq") or "").split()) == 1


async def test_a_permanent_ban_or_the_allowlist_keeps_the_limit_hash(
    api: Api, store: PairingStore
) -> None:
    key = store.keys.limit("app", "a1")
    await _fail(api, "a1", 1)
    assert await store.client.pttl(key) > 0
    await store.set_ban("app", "a1", reason="test", by="tests", duration_s=None)
    assert await store.client.pttl(key) == -1
    assert await store.set_allowed("app", "a1", True)
    assert not await store.set_allowed("app", "a1", True)  # nothing changed
    assert await store.lift_ban("app", "a1", penalty=True) == (True, False)
    assert await store.client.pttl(key) == -1  # still allowlisted
    assert await store.lift_ban("app", "a1", penalty=True) == (False, False)
    assert await store.set_allowed("app", "a1", False)
    # back to the TTL of what it holds: the failure and request logs
    s = api.settings
    longest_ms = 2 * max(s.pairing_app_request_window_s, s.pairing_fail_window_s) * 1000
    assert 0 < await store.client.pttl(key) <= longest_ms
    assert await failures_logged(store, "app", "a1") == 1


async def test_a_ban_of_a_while_runs_out_by_itself(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api()
    code = await api.code("r1")
    await store.set_ban("app", "a1", reason="test", by="tests", duration_s=1)
    reply = await api.pair("a1", code)
    assert error_code(reply) == "BANNED"
    assert reply["error"]["retry_after_s"] == 1
    await asyncio.sleep(1.1)
    assert (await api.pair("a1", code))["ok"]
    # it ran out: there is nothing to lift
    assert await store.lift_ban("app", "a1", penalty=True) == (False, False)


async def test_lifting_a_penalty_forgets_its_strikes_and_failures(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = _penalty_api(make_api)
    await _fail(api, "a1", api.settings.pairing_fail_limit)
    assert _retry_after(await api.pair("a1", WRONG)) == 2
    assert await store.lift_ban("app", "a1", penalty=True) == (False, True)
    assert await store.client.hget(store.keys.limit("app", "a1"), "strikes") is None
    assert await failures_logged(store, "app", "a1") == 0
    assert error_code(await api.pair("a1", WRONG)) == "CODE_NOT_FOUND"


async def test_the_budget_set_stays_within_its_share(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    """The budget shard has no TTL: units past the window are trimmed whenever it is full,
    so it never holds more than its share (real 1 s window)."""
    api = make_api(pairing_global_fail_limit=3, pairing_global_fail_window_s=1)
    budget = store.keys.budget(0)
    for i in range(3):
        assert error_code(await api.pair(f"g{i}", WRONG)) == "CODE_NOT_FOUND"
    assert _retry_after(await api.pair("g9", WRONG)) == 1
    await asyncio.sleep(1.1)
    for i in range(3, 6):
        assert error_code(await api.pair(f"g{i}", WRONG)) == "CODE_NOT_FOUND"
    assert await store.client.zcard(budget) == 3
    assert await store.client.pttl(budget) == -1


async def test_bans_and_allowlist_of_an_earlier_version_are_moved_at_start(
    api: Api, store: PairingStore, prefix: str
) -> None:
    """Before the limit hash, a ban was `ban:{kind:id}` and the allowlist `allow:{kind:id}`:
    `migrate_legacy_limits` (run by `serve`) makes them the same ban or entry again."""
    client = store.client
    now = await redis_now_ms(client)
    await client.hset(
        f"{prefix}:ban:{{app:forever}}", mapping={"reason": "abuse", "by": "ops", "until_ms": -1}
    )
    await client.hset(
        f"{prefix}:ban:{{runner:r-hour}}",
        mapping={"reason": "spam", "by": "ops", "at_ms": now - 5000, "until_ms": now + 3_600_000},
    )
    await client.hset(
        f"{prefix}:ban:{{app:over}}", mapping={"reason": "x", "by": "y", "until_ms": now - 1}
    )
    await client.set(f"{prefix}:allow:{{app:vip}}", "1")
    assert await store.migrate_legacy_limits() == 4
    assert await store.migrate_legacy_limits() == 0  # nothing left to move
    assert not await client.exists(
        f"{prefix}:ban:{{app:forever}}",
        f"{prefix}:ban:{{runner:r-hour}}",
        f"{prefix}:ban:{{app:over}}",
        f"{prefix}:allow:{{app:vip}}",
    )
    code = await api.code("r-free")
    assert error_code(await api.pair("forever", code)) == "BANNED"
    assert error_code(await api.pair("over", code)) is None
    reply = await api.request("runner", "r-hour", "code")
    assert error_code(reply) == "BANNED"
    assert 0 < reply["error"]["retry_after_s"] <= 3600
    limit = await client.hgetall(store.keys.limit("app", "vip"))
    assert limit.get("allow") == "1"
    # the same ban: its time and its end to the ms, not a new one from the move
    moved = await client.hgetall(store.keys.limit("runner", "r-hour"))
    assert moved["ban_at_ms"] == str(now - 5000)
    assert moved["ban_until_ms"] == str(now + 3_600_000)


async def test_concurrent_wrong_guesses_cannot_overshoot_the_failure_limit(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    """Guesses in flight count toward the failure limit (found by an outside attack: 50
    wrong guesses sent at once by one app looked up 15 codes with a limit of 5)."""
    api = make_api(pairing_fail_limit=5)
    replies = await asyncio.gather(*(api.pair("a1", WRONG) for _ in range(20)))
    outcomes = [error_code(r) for r in replies]
    assert outcomes.count("CODE_NOT_FOUND") == 5
    assert outcomes.count("RATE_LIMITED") == 15
    assert {_retry_after(r) for r in replies if error_code(r) == "RATE_LIMITED"} <= {1, 300}
    # nothing is left in flight once they are answered
    assert (await store.client.hget(store.keys.limit("app", "a1"), "pg")) in ("", None)


async def test_guesses_that_end_well_or_are_refused_leave_nothing_in_flight(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_fail_limit=3)
    for i in range(6):  # more pairs than the limit, one after the other: all succeed
        await api.pair_ok("a1", await api.code(f"r{i}"))
    assert error_code(await api.pair("a1", "not a code")) == "INVALID_FORMAT"
    await api.pair_ok("a1", await api.code("r-last"))
    assert (await store.client.hget(store.keys.limit("app", "a1"), "pg")) in ("", None)
    # concurrent right guesses with two failures logged: one may be in flight at a time
    # (on one Redis they arrive together; on a cluster one may end before the next)
    await _fail(api, "a1", 2)
    codes = [await api.code(f"rc{i}") for i in range(3)]
    replies = await asyncio.gather(*(api.pair("a1", c) for c in codes))
    assert all(r["ok"] or error_code(r) == "RATE_LIMITED" for r in replies)
    assert sum(1 for r in replies if r["ok"]) >= 1
    assert (await store.client.hget(store.keys.limit("app", "a1"), "pg")) in ("", None)


async def test_an_allowlisted_app_is_not_held_by_its_guesses_in_flight(
    make_api: Callable[..., Api], store: PairingStore
) -> None:
    api = make_api(pairing_fail_limit=2)
    assert await store.set_allowed("app", "vip", True)
    replies = await asyncio.gather(*(api.pair("vip", WRONG) for _ in range(6)))
    assert [error_code(r) for r in replies] == ["CODE_NOT_FOUND"] * 6
