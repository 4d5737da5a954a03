"""A distributed guesser against the global failure budget (docs/protocol.md, "Default limits").

Many app identities guess at once against a handful of live codes, with per-app limits
set out of the way so that only the global budget (`PAIRING_GLOBAL_FAIL_LIMIT` per
`PAIRING_GLOBAL_FAIL_WINDOW_S`) stands between them and the codes. The apps are real
identities of the shipped broker configuration, provisioned with `mqtt-pairing
credentials add` into the apps password file: the budget is a service property, but the
guessers must get past the broker like any attacker.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mqtt_pairing.client import AppClient
from mqtt_pairing.config import load_settings
from mqtt_pairing.errors import ConfigError, RateLimited
from mqtt_pairing.services.ratelimit import RateLimitService
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from tests.fixtures import RedisServer
from tests.security.harness import SecureBroker, app_client, runner_client, running_service

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
N_RUNNERS = 3
N_GUESSERS = 30
GUESSES_EACH = 4
GLOBAL_LIMIT = 20
WINDOW_S = 3


def near_miss(code: str) -> str:
    """The code with one character changed: as close as a guess can be without hitting."""
    i = secrets.randbelow(len(code))
    other = secrets.choice([c for c in ALPHABET if c != code[i]])
    return code[:i] + other + code[i + 1 :]


def random_guess(live: set[str]) -> str:
    while True:
        guess = "".join(secrets.choice(ALPHABET) for _ in range(9))
        if guess not in live:
            return guess


async def test_distributed_guesser_is_capped_by_the_global_budget(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    runners = [f"r{i}-{uid}" for i in range(N_RUNNERS)]
    guessers = [f"g{i:02d}-{uid}" for i in range(N_GUESSERS)]
    legit = [f"l{i}-{uid}" for i in range(N_RUNNERS)]
    broker = make_secure_broker(runners=runners, apps=guessers + legit)
    settings: dict[str, Any] = {
        "pairing_global_fail_limit": GLOBAL_LIMIT,
        "pairing_global_fail_window_s": WINDOW_S,
        # Per-app limits out of the way: only the global budget is under test.
        "pairing_fail_limit": 1000,
        "pairing_app_request_limit": 1000,
    }
    async with (
        running_service(broker, redis_server.url, key_prefix, **settings) as service,
        contextlib.AsyncExitStack() as stack,
    ):
        runner_clients = [
            await stack.enter_async_context(runner_client(broker, r)) for r in runners
        ]
        codes = [(await rc.request_code())["code"] for rc in runner_clients]
        live = {c.replace("-", "") for c in codes}
        apps: list[AppClient] = list(
            await asyncio.gather(
                *(stack.enter_async_context(app_client(broker, g)) for g in guessers)
            )
        )
        legit_apps = [await stack.enter_async_context(app_client(broker, a)) for a in legit]

        guesses = []
        for n, app in enumerate(apps):
            for k in range(GUESSES_EACH):
                target = sorted(live)[(n + k) % len(live)]
                guess = near_miss(target) if k % 2 else random_guess(live)
                assert guess not in live
                guesses.append((app, guess))
        started = time.monotonic()
        replies = await asyncio.gather(
            *(app.request("pair", {"code": guess}, timeout_s=30) for app, guess in guesses)
        )
        elapsed_s = time.monotonic() - started

        # A legitimate pair while the budget is spent is refused too (the DoS trade-off).
        during = await legit_apps[0].request("pair", {"code": codes[0]})
        during_s = time.monotonic() - started

        outcomes = Counter(r["error"]["code"] if not r["ok"] else "OK" for r in replies)
        assert outcomes["OK"] == 0, "a guess succeeded"
        assert set(outcomes) <= {"CODE_NOT_FOUND", "RATE_LIMITED"}, outcomes
        counted = outcomes["CODE_NOT_FOUND"]
        windows = math.floor(elapsed_s / WINDOW_S) + 1
        assert 1 <= counted <= GLOBAL_LIMIT * windows, (outcomes, elapsed_s)
        if elapsed_s < WINDOW_S:
            assert counted <= GLOBAL_LIMIT, (outcomes, elapsed_s)
        assert outcomes["RATE_LIMITED"] >= len(guesses) - GLOBAL_LIMIT * windows
        for reply in replies:
            if not reply["ok"] and reply["error"]["code"] == "RATE_LIMITED":
                assert 1 <= reply["error"]["retry_after_s"] <= WINDOW_S
        assert service.gateway.dispatcher.counters["error.CODE_NOT_FOUND"] == counted
        if during_s < WINDOW_S:
            assert not during["ok"]
            assert during["error"]["code"] == "RATE_LIMITED"
            await asyncio.sleep(during["error"]["retry_after_s"])
        else:
            await asyncio.sleep(WINDOW_S)

        # After the window every live code pairs, each with its own legitimate app (on a
        # machine too slow to refuse `during`, that pair already went through).
        for n, (app, code, runner) in enumerate(zip(legit_apps, codes, runners, strict=True)):
            result = during["result"] if n == 0 and during["ok"] else await app.pair(code)
            assert result["session"]["runner_id"] == runner
        for rc in runner_clients:
            sessions = await rc.sessions()
            assert [s["app_id"] for s in sessions] == [legit[runners.index(rc.identity.id)]]


def test_more_budget_shards_than_units_is_refused() -> None:
    with pytest.raises(ConfigError, match="PAIRING_GLOBAL_FAIL_SHARDS"):
        load_settings(pairing_global_fail_limit=4, pairing_global_fail_shards=8)


async def test_budget_shards_never_raise_the_global_limit(
    redis_server: RedisServer, key_prefix: str
) -> None:
    limit, shards = 8, 3
    settings = load_settings(
        pairing_global_fail_limit=limit,
        pairing_global_fail_shards=shards,
        pairing_key_prefix=key_prefix.rstrip(":"),
    )
    store = PairingStore(connect_redis(redis_server.url), KeySchema(settings.pairing_key_prefix))
    limits = RateLimitService(store, settings)
    admitted = 0
    try:
        for n in range(20 * shards):
            try:
                await limits.reserve_budget(limits.budget_member("guesser", f"req-{n}"))
            except RateLimited:
                continue
            admitted += 1
    finally:
        await store.aclose()
    assert 0 < admitted <= limit
