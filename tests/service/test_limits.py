"""End to end: failed guesses, the automatic penalty and its end (shortened settings)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from mqtt_pairing.client import AppClient, ReplyError
from tests.service.support import Peers, StartService


async def pair_error(app: AppClient, code: str) -> ReplyError:
    with pytest.raises(ReplyError) as caught:
        await app.pair(code)
    return caught.value


async def test_failed_guesses_then_penalty(start_service: StartService, peers: Peers) -> None:
    await start_service(pairing_fail_limit=3, pairing_penalty_s=2)
    async with (
        peers.runner("r1") as runner,
        peers.app("a1") as guesser,
        peers.app("a2") as bystander,
    ):
        code = (await runner.request_code())["code"]
        # INVALID_FORMAT is not a failed guess.
        for _ in range(4):
            assert (await pair_error(guesser, "abc")).code == "INVALID_FORMAT"
        for wrong in ("000-000-000", "000-000-001", "000-000-002"):
            assert (await pair_error(guesser, wrong)).code == "CODE_NOT_FOUND"
        limited = await pair_error(guesser, "000-000-003")
        assert limited.code == "RATE_LIMITED"
        assert isinstance(limited.retry_after_s, int)
        assert 1 <= limited.retry_after_s <= 2
        # Even the right code is refused during the penalty, and it is not consumed.
        attempt = {"request_id": "right-code", "code": code}
        reply = await guesser.request("pair", attempt)
        assert reply["error"]["code"] == "RATE_LIMITED"
        retry_after_s = reply["error"]["retry_after_s"]
        assert isinstance(retry_after_s, int)
        # Another app is not affected.
        assert (await pair_error(bystander, "000-000-004")).code == "CODE_NOT_FOUND"

        await asyncio.sleep(retry_after_s + 0.2)
        # RATE_LIMITED is not remembered: the same request is handled afresh.
        reply = await guesser.request("pair", attempt)
        assert reply["ok"] is True, reply
        assert reply["result"]["session"]["app_id"] == "a1"
        # A success clears the failure window.
        for wrong in ("000-000-005", "000-000-006"):
            assert (await pair_error(guesser, wrong)).code == "CODE_NOT_FOUND"


async def test_penalty_doubles(start_service: StartService, peers: Peers) -> None:
    await start_service(pairing_fail_limit=1, pairing_penalty_s=1, pairing_penalty_max_s=60)
    async with peers.app("a1") as app:
        assert (await pair_error(app, "000-000-000")).code == "CODE_NOT_FOUND"
        first = await pair_error(app, "000-000-001")
        assert first.code == "RATE_LIMITED"
        assert first.retry_after_s == 1
        await asyncio.sleep(1.2)
        assert (await pair_error(app, "000-000-002")).code == "CODE_NOT_FOUND"
        second = await pair_error(app, "000-000-003")
        assert second.code == "RATE_LIMITED"
        assert second.retry_after_s == 2


async def test_pair_request_rate(start_service: StartService, peers: Peers) -> None:
    await start_service(pairing_app_request_limit=3)
    async with peers.app("a1") as app:
        for _ in range(3):
            assert (await pair_error(app, "abc")).code == "INVALID_FORMAT"
        limited = await pair_error(app, "abc")
        assert limited.code == "RATE_LIMITED"
        assert limited.retry_after_s is not None
        assert limited.retry_after_s >= 1


async def test_runner_code_rate(start_service: StartService, peers: Peers) -> None:
    await start_service(pairing_runner_code_limit=2)
    async with peers.runner("r1") as runner:
        await runner.request_code()
        await runner.request_code()
        with pytest.raises(ReplyError) as caught:
            await runner.request_code()
        assert caught.value.code == "RATE_LIMITED"
        assert caught.value.retry_after_s is not None


async def test_global_failure_budget(start_service: StartService, peers: Peers) -> None:
    """Two instances share the requests (one shared group) and one budget."""
    shared = {
        "pairing_global_fail_limit": 3,
        "pairing_global_fail_window_s": 60,
        "pairing_shared_group": f"budget-{uuid.uuid4().hex[:8]}",
        "pairing_key_prefix": f"e2e-{uuid.uuid4().hex[:12]}",
    }
    instances = [await start_service(**shared) for _ in range(2)]
    async with (
        peers.runner("r1") as r1,
        peers.runner("r2") as r2,
        peers.app("a1") as a1,
        peers.app("a2") as a2,
        peers.app("a3") as a3,
    ):
        # Successes give their reserved unit back.
        for runner in (r1, r2, r1, r2):
            await a1.pair((await runner.request_code())["code"])
        code = (await r1.request_code())["code"]
        # Three failures from different apps spend the budget ...
        for app, wrong in ((a1, "000-000-000"), (a2, "000-000-001"), (a2, "000-000-002")):
            assert (await pair_error(app, wrong)).code == "CODE_NOT_FOUND"
        # ... and then every pair is refused, even with a good code from a fresh app.
        limited = await pair_error(a3, code)
        assert limited.code == "RATE_LIMITED"
        assert limited.retry_after_s is not None
        assert 1 <= limited.retry_after_s <= 60
        assert (await pair_error(a1, "000-000-003")).code == "RATE_LIMITED"
    counters = [i.counters for i in instances]
    assert sum(c["error.CODE_NOT_FOUND"] for c in counters) == 3
    assert all(
        c["ok.pair"] + c["error.CODE_NOT_FOUND"] + c["error.RATE_LIMITED"] for c in counters
    ), (
        "one instance handled no pair: the budget was not shared",
        [dict(c) for c in counters],
    )
