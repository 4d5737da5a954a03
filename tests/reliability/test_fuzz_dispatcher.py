"""Fuzz: ≥ 10,000 generated topics and payloads through topic parsing and the dispatcher.

Over fakeredis (the same Lua scripts, in-process), ten items per Hypothesis example, one
after another: the topic goes through `TopicScheme.parse_request` (checked against the
docs/protocol.md rules), a request topic's payload through `Dispatcher.handle`, and now and
then a payload through `Dispatcher.handle_status`. About a third of the items are
well-formed requests shaped for their op (they reach the Lua scripts); the rest are
anything on any topic. `FUZZ_ITEMS` changes the count (default 10,000).

Nothing may raise; every reply must be a well-formed envelope that echoes the
`request_id` whenever the payload is a trustworthy object with a valid one (and carries
null otherwise); no reply may be INTERNAL_ERROR. Live codes and session ids from earlier
replies feed later requests, so pairs, unpairs and replays happen too.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fakeredis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mqtt_pairing.config import load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.store import KeySchema, PairingStore
from mqtt_pairing.topics import Kind, TopicDrop, TopicScheme
from tests.reliability.fuzzing import (
    check_envelope,
    expected_request_id,
    payloads,
    request_topic_oracle,
    requests,
    topics,
    valid_ids,
)
from tests.reliability.support import SECRET, report

ITEMS = int(os.environ.get("FUZZ_ITEMS", "10000"))
"""Generated (topic, payload) items per run (the issue asks for at least 10,000)."""
PER_EXAMPLE = 10
"""Items per Hypothesis example: the per-example overhead would dominate otherwise."""
PREFIX = "fz"


@dataclass
class Pool:
    """Live codes and sessions seen in replies, for later requests to use."""

    codes: list[str] = field(default_factory=list)
    sessions: list[str] = field(default_factory=list)
    code_of: dict[str, str] = field(default_factory=dict)
    """runner_id -> its newest code."""
    seen: set[str] = field(default_factory=set)
    """Every code issued so far (a replayed reply carries an old one)."""

    def issued(self, runner_id: str, code: str) -> None:
        """A runner's new code replaces its previous one."""
        if code in self.seen:
            return  # a replay of an earlier request
        self.seen.add(code)
        self.cancelled(runner_id)
        self.codes.append(code)
        self.code_of[runner_id] = code

    def cancelled(self, runner_id: str) -> None:
        """The runner's code (if any) is no longer live."""
        old = self.code_of.pop(runner_id, None)
        if old is not None and old in self.codes:
            self.codes.remove(old)

    def used(self, code: object) -> None:
        """A used code is not offered again: an immediate second claim would wait out the
        claim-in-flight window (2 s) before CODE_ALREADY_USED."""
        if code in self.codes:
            self.codes.remove(str(code))


def items(pool: Pool) -> st.SearchStrategy[tuple[Any, ...]]:
    """("request", topic, payload): well-formed requests shaped for their op, or anything
    on any topic; ("status", runner_id, payload, retained) at times."""
    payload = payloads(pool.codes, pool.sessions)
    by_kind = {
        "shaped": requests(PREFIX, pool.codes, pool.sessions).map(lambda tp: ("shaped", *tp)),
        "random": st.tuples(st.just("request"), topics(PREFIX), payload),
        "status": st.tuples(st.just("status"), valid_ids, payload, st.booleans()),
    }
    weights = ["random"] * 6 + ["shaped"] * 3 + ["status"]

    @st.composite
    def one(draw: st.DrawFn) -> tuple[Any, ...]:
        return draw(by_kind[draw(st.sampled_from(weights))])

    return one()


# 10,000 items take about 2 minutes on a slow shared machine: above the default.
@pytest.mark.timeout(600)
def test_dispatcher_fuzz() -> None:
    stats: Counter[str] = Counter()
    pool = Pool()
    scheme = TopicScheme(PREFIX)
    with asyncio.Runner() as runner:

        async def make() -> Dispatcher:
            client = fakeredis.FakeAsyncRedis(decode_responses=True)
            config = load_settings(
                pairing_key_prefix="fuzz",
                pairing_pending_lease_s=1,
                pairing_app_request_limit=1_000_000,
                pairing_runner_code_limit=1_000_000,
                pairing_fail_limit=1_000_000,
                pairing_global_fail_limit=1_000_000,
            )
            return Dispatcher(PairingStore(client, KeySchema("fuzz")), config, SECRET.encode())

        dispatcher = runner.run(make())

        def request(topic: str, payload: bytes, kind: str) -> None:
            parsed = scheme.parse_request(topic)
            oracle = request_topic_oracle(PREFIX, topic)
            if isinstance(parsed, TopicDrop):
                assert oracle is None, (topic, parsed)
                stats["topic_dropped"] += 1
                return
            assert oracle == (parsed.identity.kind.value, parsed.identity.id, parsed.op), topic
            identity, op = parsed.identity, parsed.op
            handled = runner.run(dispatcher.handle(identity, op, payload))
            reply = handled.reply
            if reply is None:
                assert (identity.kind, op) == (Kind.RUNNER, "heartbeat"), (topic, payload)
                stats["no_reply"] += 1
                return
            check_envelope(reply)
            assert reply["request_id"] == expected_request_id(payload), (topic, payload, reply)
            outcome = "ok" if reply["ok"] else reply["error"]["code"]
            assert outcome != "INTERNAL_ERROR", (topic, payload, reply)
            stats[f"{kind}.{op if op in ('code', 'pair') else 'other'}.{outcome}"] += 1
            if not reply["ok"]:
                return
            result = reply["result"]
            if (identity.kind, op) == (Kind.RUNNER, "code"):
                pool.issued(identity.id, result["code"])
            if (identity.kind, op) == (Kind.RUNNER, "cancel-code") and result["cancelled"]:
                pool.cancelled(identity.id)
            if (identity.kind, op) == (Kind.APP, "pair"):
                pool.used(payload_code(payload))
                pool.sessions.append(result["session"]["session_id"])

        @settings(
            max_examples=-(-ITEMS // PER_EXAMPLE),
            deadline=None,
            suppress_health_check=list(HealthCheck),
            # The pool of live codes is state: a shrunk example would not replay the same.
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            print_blob=True,
        )
        @given(st.lists(items(pool), min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
        def run(batch: list[tuple[Any, ...]]) -> None:
            for item in batch:
                stats["items"] += 1
                if item[0] == "status":
                    _, runner_id, payload, retained = item
                    handled = runner.run(
                        dispatcher.handle_status(runner_id, payload, retained=retained)
                    )
                    assert handled.reply is None
                    stats["status"] += 1
                else:
                    request(item[1], item[2], item[0])

        started = time.monotonic()
        run()
        elapsed = time.monotonic() - started
        assert "error.INTERNAL_ERROR" not in dispatcher.counters

    assert stats["items"] >= ITEMS
    report("dispatcher fuzz", seconds=f"{elapsed:.1f}", **dict(sorted(stats.items())))


def payload_code(payload: bytes) -> object:
    try:
        return json.loads(payload).get("code")
    except (ValueError, AttributeError):
        return None
