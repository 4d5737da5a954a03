"""A distributed guesser against the global failure budget (docs/protocol.md, "Default limits").

Many app identities guess at once against a handful of live codes, with per-app limits
set out of the way so that only the global budget (`PAIRING_GLOBAL_FAIL_LIMIT` per
`PAIRING_GLOBAL_FAIL_WINDOW_S`) stands between them and the codes. The apps are real
identities of the shipped broker configuration, provisioned with `mqtt-pairing
credentials add` into the apps password file: the budget is a service property, but the
guessers must get past the broker like any attacker. Two service instances share the
requests (one shared group), so the budget is checked as the global budget it is, not
one instance's.

The checks are exact, never relaxed for a slow run: the window is long enough for the
burst to fit in it many times over, and the test proves from Redis time that it did (a
burst that outlasted the window fails the test, it does not loosen the checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from mqtt_pairing.client import AppClient
from mqtt_pairing.config import load_settings
from mqtt_pairing.errors import ConfigError, RateLimited
from mqtt_pairing.services.ratelimit import RateLimitService
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from tests.harness.servers import RedisServer
from tests.security.harness import (
    PAIRING_SECRET,
    SecureBroker,
    app_client,
    runner_client,
)
from tests.service.support import RunningService, instances

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
N_INSTANCES = 2
N_RUNNERS = 3
N_GUESSERS = 30
GUESSES_EACH = 4
GLOBAL_LIMIT = 20
WINDOW_S = 10
"""Long against the burst (about a second here), so the whole burst falls in one window:
the test checks that from Redis time and fails if it did not."""
RECOVERY_BOUND_S = WINDOW_S + 10
"""How long after the burst the legitimate pairs may take to get through (the window,
and slack for a loaded machine)."""


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


def redis_ms(server: RedisServer) -> int:
    """Redis time in ms: the clock the budget's window runs on."""
    with server.client() as client:
        secs, micros = client.time()
    return int(secs) * 1000 + int(micros) // 1000


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
    base: dict[str, Any] = {
        "mqtt_url": broker.service_url,
        "redis_url": redis_server.url,
        "pairing_secret": PAIRING_SECRET,
        "pairing_topic_prefix": "pairing",
        "pairing_key_prefix": key_prefix.rstrip(":"),
        "pairing_shared_group": f"g{uuid.uuid4().hex[:10]}",
        "pairing_shutdown_grace_s": 2.0,
        "mqtt_reconnect_max_s": 1.0,
        "pairing_global_fail_limit": GLOBAL_LIMIT,
        "pairing_global_fail_window_s": WINDOW_S,
        # Per-app limits out of the way: only the global budget is under test.
        "pairing_fail_limit": 1000,
        "pairing_app_request_limit": 1000,
    }
    async with instances(base) as start, contextlib.AsyncExitStack() as stack:
        services: list[RunningService] = [await start() for _ in range(N_INSTANCES)]
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
        assert len(guesses) > GLOBAL_LIMIT
        burst_from_ms = redis_ms(redis_server)
        replies = await asyncio.gather(
            *(app.request("pair", {"code": guess}, timeout_s=30) for app, guess in guesses)
        )
        # A legitimate pair while the budget is spent is refused too (the DoS trade-off).
        during = await legit_apps[0].request("pair", {"code": codes[0]})
        burst_to_ms = redis_ms(redis_server)
        if burst_to_ms - burst_from_ms >= WINDOW_S * 1000:
            pytest.fail(
                f"the burst took {burst_to_ms - burst_from_ms} ms of Redis time, longer than "
                f"the {WINDOW_S} s window: the exact checks below need it inside one window"
            )

        # Every guess reserved its unit inside one window: exactly GLOBAL_LIMIT were looked
        # up, whichever instance took them; every other one was refused before the lookup.
        outcomes = Counter(r["error"]["code"] if not r["ok"] else "OK" for r in replies)
        assert outcomes == {
            "CODE_NOT_FOUND": GLOBAL_LIMIT,
            "RATE_LIMITED": len(guesses) - GLOBAL_LIMIT,
        }, outcomes
        for reply in replies:
            if not reply["ok"] and reply["error"]["code"] == "RATE_LIMITED":
                assert 1 <= reply["error"]["retry_after_s"] <= WINDOW_S, reply
        handled = [s.counters for s in services]
        assert sum(c["error.CODE_NOT_FOUND"] for c in handled) == GLOBAL_LIMIT
        assert all(c["error.CODE_NOT_FOUND"] + c["error.RATE_LIMITED"] > 0 for c in handled), (
            "one instance took no guess: the budget was not shared",
            [dict(c) for c in handled],
        )
        assert not during["ok"], during
        assert during["error"]["code"] == "RATE_LIMITED", during
        assert 1 <= during["error"]["retry_after_s"] <= WINDOW_S, during

        # Once the window has moved past the burst, every live code pairs, each with its
        # own legitimate app; not a moment before (Redis time).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECOVERY_BOUND_S
        for app, code, runner in zip(legit_apps, codes, runners, strict=True):
            while True:
                reply = await app.request("pair", {"code": code})
                if reply["ok"]:
                    break
                assert reply["error"]["code"] == "RATE_LIMITED", reply
                assert loop.time() < deadline, f"still refused {RECOVERY_BOUND_S} s on: {reply}"
                await asyncio.sleep(reply["error"]["retry_after_s"])  # what a client does
            assert reply["result"]["session"]["runner_id"] == runner
            assert redis_ms(redis_server) >= burst_from_ms + WINDOW_S * 1000
        for rc in runner_clients:
            sessions = await rc.sessions()
            assert [s["app_id"] for s in sessions] == [legit[runners.index(rc.identity.id)]]


def test_more_budget_shards_than_units_is_refused() -> None:
    with pytest.raises(ConfigError, match="PAIRING_GLOBAL_FAIL_SHARDS"):
        load_settings(pairing_global_fail_limit=4, pairing_global_fail_shards=8)


async def test_budget_shards_never_raise_the_global_limit(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """Two instances (each its own connection) reserve at once: together within the limit."""
    limit, shards = 8, 3
    settings = load_settings(
        pairing_global_fail_limit=limit,
        pairing_global_fail_shards=shards,
        pairing_key_prefix=key_prefix.rstrip(":"),
    )
    stores = [
        PairingStore(connect_redis(redis_server.url), KeySchema(settings.pairing_key_prefix))
        for _ in range(2)
    ]
    instances = [RateLimitService(store, settings) for store in stores]

    async def reserve(n: int) -> bool:
        limits = instances[n % len(instances)]
        try:
            return await limits.reserve_budget(limits.budget_member("guesser", f"req-{n}"))
        except RateLimited:
            return False

    try:
        admitted = await asyncio.gather(*(reserve(n) for n in range(20 * shards)))
    finally:
        for store in stores:
            await store.aclose()
    assert 0 < sum(admitted) <= limit
