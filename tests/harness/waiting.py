"""Waiting for a condition with a bound: the one way tests synchronise with what they watch.

A test never sleeps to let something happen; it polls the condition it needs (a reply
seen, a key gone, Redis's clock past a deadline) and fails with what it was waiting for
once the bound is spent. Bounds are generous (the machine is shared and loaded); they
define "did not happen", not how fast it happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis
import redis.asyncio as aioredis

T = TypeVar("T")

POLL_INTERVAL_S = 0.02


async def wait_until(
    condition: Callable[[], T | Awaitable[T]],
    timeout_s: float,
    what: str,
    interval_s: float = POLL_INTERVAL_S,
) -> T:
    """Poll `condition` until it returns something truthy, and return that.

    Args:
        condition: a function, or a coroutine function, checked at once and then every
            `interval_s`.
        timeout_s: the bound, seconds.
        what: what is awaited, for the failure message.
        interval_s: time between two checks, seconds.

    Fails the test (`pytest.fail`) when `timeout_s` passes first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(interval_s)


def wait_until_sync(
    condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = POLL_INTERVAL_S
) -> T:
    """`wait_until` for code without an event loop (threads, sync fixtures)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def redis_ms(client: redis.Redis) -> int:
    """Redis time in ms: the clock every TTL, window and deadline of the service runs on."""
    secs, micros = client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def aredis_ms(client: aioredis.Redis) -> int:
    """`redis_ms` for an asyncio client."""
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def wait_redis_time(
    client: aioredis.Redis, at_ms: int, what: str, slack_s: float = 10
) -> int:
    """Wait until Redis's clock reads `at_ms` or later; returns the time it read.

    Bounded by the distance to `at_ms` (host time) plus `slack_s`.
    """
    now = await aredis_ms(client)
    bound_s = max(0.0, (at_ms - now) / 1000) + slack_s

    async def past() -> int:
        t = await aredis_ms(client)
        return t if t >= at_ms else 0

    return await wait_until(past, bound_s, what, interval_s=0.01)


__all__ = [
    "POLL_INTERVAL_S",
    "aredis_ms",
    "redis_ms",
    "wait_redis_time",
    "wait_until",
    "wait_until_sync",
]
