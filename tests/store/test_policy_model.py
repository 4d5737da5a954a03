"""The app-slot failure/penalty Lua (finish_request, begin_request) against its pure model,
`mqtt_pairing.policy.FailurePolicy`, as a Hypothesis state machine.

Redis time cannot be controlled, so windows, penalties and the memory are long (the
sliding window never drops a failure, a penalty never runs out by itself within a test):
the machine compares when penalties start, their length and strike counts, the failure
window and whether the app is blocked; a penalty running out is a rule of its own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Literal, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from mqtt_pairing.errors import RateLimited
from mqtt_pairing.policy import FailurePolicy
from mqtt_pairing.store import KeySchema, PairingStore
from mqtt_pairing.store.redis_store import Begin
from tests.harness.servers import StoreBackend

WINDOW_S = 100_000
FIRST_PENALTY_S = 1_000
MAX_PENALTY_S = 3_000  # the third penalty in a row is capped
MEMORY_S = 1_000_000
APP = "app1"
T = TypeVar("T")
MACHINE_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    # no "explain" phase: its line tracer makes a failing run over asyncio take minutes
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


class FailureMachine(RuleBasedStateMachine):
    backend: StoreBackend

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.client = self.backend.client()
        self.store = PairingStore(self.client, KeySchema(f"hyp-{uuid.uuid4().hex[:12]}"))
        self.model = FailurePolicy(
            limit=5,
            window_ms=WINDOW_S * 1000,
            first_penalty_ms=FIRST_PENALTY_S * 1000,
            max_penalty_ms=MAX_PENALTY_S * 1000,
            memory_ms=MEMORY_S * 1000,
        )
        self.now_ms = 1_000_000  # model time: a millisecond per step
        self.last_penalty_s = 0

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def tick(self) -> int:
        self.now_ms += 1
        return self.now_ms

    async def _finish(
        self, outcome: Literal["failure", "success"], *, allowlisted: bool = False
    ) -> tuple[int, int]:
        return await self.store.finish_request(
            "app",
            APP,
            "pair",
            uuid.uuid4().hex,
            reply=None,
            dedupe_ttl_s=600,
            outcome=outcome,
            allowlisted=allowlisted,
            fail_limit=self.model.limit,
            fail_window_s=WINDOW_S,
            penalty_s=FIRST_PENALTY_S,
            penalty_max_s=MAX_PENALTY_S,
            penalty_memory_s=MEMORY_S,
        )

    @initialize(limit=st.integers(min_value=1, max_value=4))
    def set_limit(self, limit: int) -> None:
        self.model.limit = limit
        self.model.failures.limit = limit

    @rule()
    def failure(self) -> None:
        penalty_s, strikes = self.run(self._finish("failure"))
        pen_ms = self.model.record_failure(self.tick())
        assert penalty_s == pen_ms // 1000
        assert strikes == (self.model.strikes if pen_ms else 0)
        if pen_ms:
            self.last_penalty_s = penalty_s

    @rule()
    def allowlisted_failure(self) -> None:
        # allowlisted: the Lua records nothing; the model is not called
        assert self.run(self._finish("failure", allowlisted=True)) == (0, 0)

    @rule()
    def success(self) -> None:
        assert self.run(self._finish("success")) == (0, 0)
        self.model.record_success()

    @precondition(lambda self: self.model.penalty_until_ms > 0)
    @rule()
    def penalty_runs_out(self) -> None:
        key = self.store.keys.limit("app", APP)
        self.run(self.client.hset(key, "penalty_until_ms", 0))
        self.model.penalty_until_ms = 0

    @invariant()
    def same_strikes_and_window(self) -> None:
        keys = self.store.keys
        strikes = self.run(self.client.hget(keys.limit("app", APP), "strikes"))
        assert int(strikes or 0) == self.model.strikes
        log = self.run(self.client.hget(keys.limit("app", APP), "fl")) or ""
        failures = len(log.split())  # the window is longer than the test
        assert failures == self.model.failures.count(self.now_ms)

    @invariant()
    def blocked_alike(self) -> None:
        blocked_ms = self.model.blocked_for_ms(self.now_ms)
        limited: RateLimited | None = None
        try:
            begun = self.run(
                self.store.begin_request(
                    "app",
                    APP,
                    "pair",
                    uuid.uuid4().hex,
                    "h",
                    lease_s=10,
                    dedupe_ttl_s=0,
                    check_ban=True,
                    check_penalty=True,
                )
            )
        except RateLimited as exc:
            limited = exc
        if limited is None:
            assert isinstance(begun, Begin)
            assert blocked_ms == 0
        else:
            assert blocked_ms > 0
            assert limited.retry_after_s is not None
            # Redis time has moved on a little since the penalty started
            assert self.last_penalty_s - 60 <= limited.retry_after_s <= self.last_penalty_s

    def teardown(self) -> None:
        self.run(self.client.aclose())
        self.loop.close()


@pytest.mark.slow
def test_failure_policy_lua_matches_the_model(store_backend: StoreBackend) -> None:
    machine = type("BoundFailureMachine", (FailureMachine,), {"backend": store_backend})
    # The scripts run in the same redis-server Lua on a cluster; what the cluster adds is
    # routing, which every other store test covers. A few examples there (each builds a
    # cluster client) check that the model holds through it without 30 s of CI time.
    chosen = (
        settings(MACHINE_SETTINGS, max_examples=5) if store_backend.cluster else MACHINE_SETTINGS
    )
    run_state_machine_as_test(machine, settings=chosen)
