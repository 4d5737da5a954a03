"""A pair racing `cancel-code`, step by step: every interleaving, exactly one of them wins.

docs/protocol.md "Other ops": `cancel-code` answers `cancelled: false` only when there was
no live code; "App pair": a code cancelled between the lookup and the session answers
`CODE_ALREADY_USED`. For a single-use code the pair and the cancel cannot both win, and
one of them must.

The pair's Redis round trips that matter are its claim (code slot), its open (runner
slot) and its finish (the claim given back, or settled); the cancel's are
`clear_runner_code` (runner slot) and `end_code` (code slot). The test holds each of them
until the schedule says it may run, so every one of the 10 orders of those five steps is
played for real (tests/races/test_claims.py races them from separate processes, where
only some orders happen). The winner follows from the runner slot: the pair wins iff its
session opened before the cancel cleared the code.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Any

import pytest

from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.redis_store import Call, ScriptCall
from mqtt_pairing.topics import Kind
from tests.store.helpers import Api, error_code

Step = tuple[str, str]
PAIR = [("pair", "claim"), ("pair", "open"), ("pair", "finish")]
CANCEL = [("cancel", "clear"), ("cancel", "end")]
STEP_OF_SCRIPT = {
    "claim_code": "claim",
    "open_session": "open",
    "unclaim_code": "finish",
    "settle_claim": "finish",
    "clear_runner_code": "clear",
    "end_code": "end",
}

_ACTOR: ContextVar[str] = ContextVar("actor", default="")


def schedules() -> list[list[Step]]:
    """Every merge of the pair's steps with the cancel's, each side in its own order."""
    out = []
    for at in itertools.combinations(range(5), 2):
        pair, cancel = iter(PAIR), iter(CANCEL)
        out.append([next(cancel) if i in at else next(pair) for i in range(5)])
    return out


class Schedule:
    """Holds each gated step of an actor until every step before it ran (or never will)."""

    def __init__(self, order: Sequence[Step]) -> None:
        self.order = list(order)
        self.done: set[Step] = set()
        self.finished: set[str] = set()
        self.ran: list[Step] = []
        self.changed = asyncio.Condition()

    def _ready(self, step: Step) -> bool:
        before = self.order[: self.order.index(step)]
        return all(s in self.done or s[0] in self.finished for s in before)

    async def run(self, step: Step, work: Awaitable[Any]) -> Any:
        async with self.changed:
            await self.changed.wait_for(lambda: self._ready(step))
        try:
            return await work
        finally:
            async with self.changed:
                self.ran.append(step)
                self.done.add(step)
                self.changed.notify_all()

    async def play(self, actor: str, work: Callable[[], Awaitable[Any]]) -> Any:
        _ACTOR.set(actor)
        try:
            return await work()
        finally:
            async with self.changed:
                self.finished.add(actor)
                self.changed.notify_all()


def gate(store: PairingStore, monkeypatch: pytest.MonkeyPatch) -> Callable[[Schedule], None]:
    """Route the store's round trips through the schedule in force (set by the returned
    function). A batch is one step (named by the gated script in it); on a cluster its
    calls come through `_run` again, which then passes them on."""
    current: list[Schedule] = []
    batch, run = store.batch, store._run
    inside: ContextVar[bool] = ContextVar("inside", default=False)

    def step_of(names: Sequence[str]) -> Step | None:
        actor = _ACTOR.get()
        for name in names:
            step = STEP_OF_SCRIPT.get(name)
            if step is not None and actor and current and (actor, step) in current[0].order:
                return actor, step
        return None

    async def gated_batch(calls: Sequence[Call]) -> list[Any]:
        step = step_of([c.name for c in calls if isinstance(c, ScriptCall)])
        if step is None or inside.get():
            return await batch(calls)

        async def inner() -> list[Any]:
            token = inside.set(True)
            try:
                return await batch(calls)
            finally:
                inside.reset(token)

        result: list[Any] = await current[0].run(step, inner())
        return result

    async def gated_run(name: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        step = step_of([name])
        if step is None or inside.get():
            return await run(name, keys, args)
        return await current[0].run(step, run(name, keys, args))

    monkeypatch.setattr(store, "batch", gated_batch)
    monkeypatch.setattr(store, "_run", gated_run)

    def use(schedule: Schedule) -> None:
        current[:] = [schedule]

    return use


@pytest.mark.parametrize("max_uses", [1, 2])
async def test_a_pair_and_a_cancel_in_every_order_one_wins(
    api: Api, monkeypatch: pytest.MonkeyPatch, max_uses: int
) -> None:
    use = gate(api.store, monkeypatch)
    for n, order in enumerate(schedules()):
        runner_id, app_id = f"r{n}", f"a{n}"
        code = await api.code(runner_id, max_uses=max_uses)
        schedule = Schedule(order)
        use(schedule)
        pair, cancel = await asyncio.wait_for(
            asyncio.gather(
                schedule.play("pair", lambda: api.pair(app_id, code)),  # noqa: B023
                schedule.play(
                    "cancel",
                    lambda: api.request(Kind.RUNNER, runner_id, "cancel-code"),  # noqa: B023
                ),
            ),
            timeout=20,
        )
        # The steps ran in the schedule's order (those that ran at all).
        assert schedule.ran == [s for s in order if s in schedule.ran], (order, schedule.ran)
        assert cancel["ok"], cancel
        cancelled = cancel["result"]["cancelled"]
        opened_first = order.index(("pair", "open")) < order.index(("cancel", "clear"))
        assert error_code(pair) in (None, "CODE_ALREADY_USED"), (order, pair)
        assert pair["ok"] is opened_first, (order, pair, cancel)
        if max_uses == 1:
            assert pair["ok"] != cancelled, (order, pair, cancel)
        else:
            assert cancelled, (order, pair, cancel)  # a use was left either way
        stored = await api.sessions_of(runner_id)
        if pair["ok"]:
            assert list(stored) == [pair["result"]["session"]["session_id"]]
        else:
            assert stored == {}, (order, stored)
        # Cancelled for good: no use was given back to a later pair.
        assert error_code(await api.pair(f"late-{n}", code)) == "CODE_ALREADY_USED"
        assert (await api.code_hash(code))["state"] in ("cancelled", "used")
