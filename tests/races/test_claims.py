"""Claims racing each other and the code's own life, from separate OS processes.

Each worker is a process of its own with its own Dispatcher and Redis connections, as
service instances are; all are released at one moment (a Redis list they BLPOP), so
their requests reach Redis together. Checked on a single Redis and on the cluster:

- many apps in three processes pair one code: exactly `max_uses` sessions, every other
  pair CODE_ALREADY_USED, and Redis holds exactly the sessions that were answered;
- a pair racing the runner's `cancel-code`: exactly one of them wins;
- a pair racing the runner's next `code` (which replaces the old one): the pair is
  answered as Redis ended (a session iff ok), and the new code works;
- pairs racing the code's expiry: ok before the deadline, CODE_EXPIRED after, never a
  session that began after the deadline.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.harness.api import Api
from tests.harness.servers import StoreBackend
from tests.races.support import Outcome, request, run_workers

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

WORKERS = 4


def flat(results: list[list[Outcome]]) -> list[Outcome]:
    return [o for worker in results for o in worker]


async def test_claims_from_separate_processes_contend_for_one_code(
    race_backend: StoreBackend, race_prefix: str, race_api: Api, tmp_path: Path
) -> None:
    uses = {f"r{i}": 1 + i % 3 for i in range(4)}
    codes = {r: await race_api.code(r, max_uses=n) for r, n in uses.items()}
    contenders = 3  # workers, each with 6 apps per code: 18 contenders for every code
    jobs = [
        [request("app", f"w{w}-a{j}-{r}", "pair", code=codes[r]) for j in range(6) for r in codes]
        for w in range(contenders)
    ]
    for job in jobs:
        random.Random(len(job)).shuffle(job)
    outcomes = flat(
        await run_workers(
            race_backend.url, race_prefix, jobs, tmp_path, cluster=race_backend.cluster
        )
    )

    by_code: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        by_code[o.request["body"]["code"]].append(o)
    for runner_id, code in codes.items():
        got = by_code[code]
        assert Counter(o.code for o in got) == {
            "ok": uses[runner_id],
            "CODE_ALREADY_USED": len(got) - uses[runner_id],
        }, (runner_id, Counter(o.code for o in got))
        won = {o.reply["result"]["session"]["session_id"]: o for o in got if o.ok}
        assert len(won) == uses[runner_id], "two pairs were given one session"
        stored = await race_api.sessions_of(runner_id)
        assert set(stored) == set(won), (runner_id, sorted(stored), sorted(won))
        for sid, o in won.items():
            assert stored[sid]["app_id"] == o.request["id"]
            assert o.reply["result"]["session"]["runner_id"] == runner_id


async def test_a_pair_racing_cancel_code_one_wins(
    race_backend: StoreBackend, race_prefix: str, race_api: Api, tmp_path: Path
) -> None:
    runners = [f"r{i}" for i in range(40)]
    codes = {r: await race_api.code(r) for r in runners}
    rng = random.Random(16)
    cancels = [request("runner", r, "cancel-code", delay_ms=rng.randrange(15)) for r in runners]
    pairs = [
        request("app", f"a-{r}", "pair", delay_ms=rng.randrange(15), code=codes[r]) for r in runners
    ]
    runner_side, app_side = await run_workers(
        race_backend.url, race_prefix, [cancels, pairs], tmp_path, cluster=race_backend.cluster
    )
    for runner_id, cancel, pair in zip(runners, runner_side, app_side, strict=True):
        assert cancel.ok, cancel.reply
        cancelled = cancel.reply["result"]["cancelled"]
        assert pair.code in ("ok", "CODE_ALREADY_USED"), pair.reply
        assert pair.ok != cancelled, (runner_id, pair.reply, cancel.reply)
        stored = await race_api.sessions_of(runner_id)
        if pair.ok:
            assert list(stored) == [pair.reply["result"]["session"]["session_id"]]
        else:
            assert stored == {}, (runner_id, stored)


async def test_a_pair_racing_the_runners_next_code(
    race_backend: StoreBackend, race_prefix: str, race_api: Api, tmp_path: Path
) -> None:
    runners = [f"r{i}" for i in range(40)]
    old = {r: await race_api.code(r) for r in runners}
    rng = random.Random(17)
    renew = [request("runner", r, "code", delay_ms=rng.randrange(15)) for r in runners]
    pairs = [
        request("app", f"a-{r}", "pair", delay_ms=rng.randrange(15), code=old[r]) for r in runners
    ]
    runner_side, app_side = await run_workers(
        race_backend.url, race_prefix, [renew, pairs], tmp_path, cluster=race_backend.cluster
    )
    for runner_id, issued, pair in zip(runners, runner_side, app_side, strict=True):
        assert issued.ok, issued.reply
        assert pair.code in ("ok", "CODE_ALREADY_USED"), pair.reply
        stored = await race_api.sessions_of(runner_id)
        if pair.ok:
            assert list(stored) == [pair.reply["result"]["session"]["session_id"]]
        else:
            assert stored == {}, (runner_id, stored)
        # The old code is spent either way; the new one pairs.
        again = await race_api.request("app", f"late-{runner_id}", "pair", code=old[runner_id])
        assert again["error"]["code"] == "CODE_ALREADY_USED", again
        new = issued.reply["result"]["code"]
        paired = await race_api.request("app", f"next-{runner_id}", "pair", code=new)
        assert paired["ok"], (runner_id, paired)


async def test_pairs_racing_the_codes_expiry(
    race_backend: StoreBackend, race_prefix: str, race_api: Api, tmp_path: Path
) -> None:
    runners = [f"r{i}" for i in range(4)]
    codes: dict[str, str] = {}
    deadline: dict[str, int] = {}

    async def prepare() -> tuple[list[list[dict[str, Any]]], int]:
        # Issued once the workers are ready (the codes live 2 s); released 1 s before the
        # first deadline, with pairs spread over the next 2 s, so that some land before
        # each code's deadline and some after.
        for r in runners:
            codes[r] = await race_api.code(r, ttl_s=2, max_uses=50)
            deadline[r] = await race_api.expires_ms(codes[r])
        jobs = [
            [
                request("app", f"w{w}-a{j}-{r}", "pair", delay_ms=100 * j + 25 * w, code=codes[r])
                for j in range(20)
                for r in runners
            ]
            for w in range(WORKERS)
        ]
        return jobs, min(deadline.values()) - 1000

    outcomes = flat(
        await run_workers(
            race_backend.url,
            race_prefix,
            prepare,
            tmp_path,
            workers=WORKERS,
            cluster=race_backend.cluster,
        )
    )
    assert Counter(o.code for o in outcomes).keys() <= {"ok", "CODE_EXPIRED"}, Counter(
        o.code for o in outcomes
    )
    for runner_id, code in codes.items():
        got = [o for o in outcomes if o.request["body"]["code"] == code]
        won = [o for o in got if o.ok]
        for o in got:
            if o.done_ms < deadline[runner_id]:
                assert o.ok, ("refused before the deadline", o.reply, deadline[runner_id])
        for o in won:
            assert o.start_ms < deadline[runner_id], ("paired after the deadline", o.reply)
        stored = await race_api.sessions_of(runner_id)
        assert set(stored) == {o.reply["result"]["session"]["session_id"] for o in won}
    # The race was real: some pairs made it and some were too late.
    assert Counter(o.code for o in outcomes).keys() == {"ok", "CODE_EXPIRED"}
