"""Bursts are queued, not failed (issue 14, second item).

With Redis healthy, no request gets SERVICE_UNAVAILABLE, however many arrive at once:
the gateway takes `PAIRING_MAX_INFLIGHT` at a time (the rest wait in the broker), and
the store has a connection for each of them and for the service's own background work,
waiting for a free one rather than failing (docs/design.md "Redis connections").

`serve` runs as a process on real Mosquitto and a real redis-server (and on the cluster).
1,000 runners ask for a code, all at once; then 1,000 more runners ask for a code and
1,000 apps pair with the first codes, all 2,000 published at once. Meanwhile another
client keeps Redis busy now and then with a script of `STALL_MS` (every master of the
cluster), as a healthy Redis under other load is: well within `REDIS_TIMEOUT_S`, yet
long enough for every request in flight to want a connection at the same moment. Every
request gets exactly one reply, every reply is `ok`, and the service never logs Redis as
unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
import redis

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.fixtures import MakeServe
from tests.harness.recorder import Recorder, recording
from tests.harness.servers import MosquittoBroker, RedisClusterServers, RedisServer
from tests.harness.waiting import wait_until

BURST = 1_000
"""Requests of each kind in a burst."""
ANSWER_TIMEOUT_S = 90.0
"""Every reply of a burst has arrived by then (a bound on "answered", not a speed)."""
STALL_MS = 300
"""How long one script of the other client keeps Redis busy (REDIS_TIMEOUT_S is 1 s)."""
STALL_EVERY_S = 1.0

_STALL = """
local t = redis.call('TIME')
local until_us = t[1] * 1000000 + t[2] + ARGV[1] * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us
return 1
"""
Request = tuple[str, str, dict[str, Any]]
"""(request topic, reply topic, body)."""


def _replies_by_topic(
    recorder: Recorder, topics: dict[str, str]
) -> dict[str, list[dict[str, Any]]]:
    """The replies seen on each awaited topic (one pass over what was recorded)."""
    out: dict[str, list[dict[str, Any]]] = {topic: [] for topic in topics}
    for message in recorder.seen:
        replies = out.get(message.topic)
        if replies is not None:
            replies.append(message.body)
    return out


async def _keep_redis_busy(urls: Sequence[str], stop: asyncio.Event) -> int:
    """Run a `STALL_MS` script on every node every `STALL_EVERY_S` until `stop`; how many."""
    clients = [redis.Redis.from_url(url) for url in urls]
    stalls = 0
    try:
        while not stop.is_set():
            await asyncio.gather(*(asyncio.to_thread(c.eval, _STALL, 0, STALL_MS) for c in clients))
            stalls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STALL_EVERY_S)
    finally:
        for client in clients:
            client.close()
    return stalls


async def _burst(
    recorder: Recorder, requests: list[Request], busy: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Publish every request at once and wait until each has its reply, while the Redis
    nodes at `busy` are stalled now and then; the replies by reply topic.

    Fails if a request has no reply within `ANSWER_TIMEOUT_S` or more than one.
    """
    awaited = {reply: body["request_id"] for _, reply, body in requests}
    assert len(awaited) == len(requests)
    stop = asyncio.Event()
    stalling = asyncio.create_task(_keep_redis_busy(busy, stop))
    try:
        await asyncio.gather(
            *(recorder.publish(topic, json.dumps(body)) for topic, _, body in requests)
        )

        def answered() -> bool:
            return all(_replies_by_topic(recorder, awaited).values())

        await wait_until(answered, ANSWER_TIMEOUT_S, "a reply to every request", 0.25)
    finally:
        stop.set()
        stalls = await stalling
    assert stalls > 0
    replies = _replies_by_topic(recorder, awaited)
    doubled = [topic for topic, r in replies.items() if len(r) != 1]
    assert not doubled, f"{len(doubled)} requests answered more than once, e.g. {doubled[:3]}"
    for topic, (reply,) in replies.items():
        assert reply["request_id"] == awaited[topic], reply
    return {topic: reply for topic, (reply,) in replies.items()}


def _tally(replies: dict[str, dict[str, Any]]) -> Counter[str]:
    return Counter("ok" if r.get("ok") else str(r["error"]["code"]) for r in replies.values())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["redis", "cluster"])
async def test_a_burst_of_requests_is_queued_not_failed(
    backend: str,
    request: pytest.FixtureRequest,
    serve_process: MakeServe,
    mosquitto_broker: MosquittoBroker,
    topic_prefix: str,
) -> None:
    env = {"PAIRING_RUNNER_CODE_LIMIT": "1000", "PAIRING_APP_REQUEST_LIMIT": "1000"}
    if backend == "cluster":
        cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
        env["REDIS_CLUSTER_URL"] = cluster.url
        busy = [node.url for node in cluster.masters()]
    else:
        single: RedisServer = request.getfixturevalue("redis_server")
        busy = [single.url]
    serve = serve_process(**env)
    serve.start()
    await serve.wait_ready()
    address = BrokerAddress(mosquitto_broker.host, mosquitto_broker.port)
    tag = uuid.uuid4().hex[:6]
    p = topic_prefix

    def code(runner: str) -> Request:
        body = {"request_id": f"code-{runner}"}
        return f"{p}/runners/{runner}/req/code", f"{p}/runners/{runner}/res/code", body

    def pair(app: str, code: str) -> Request:
        body = {"request_id": f"pair-{app}", "code": code}
        return f"{p}/apps/{app}/req/pair", f"{p}/apps/{app}/res/pair", body

    async with recording(address, f"{p}/+/+/res/+", prefix=p, label="burst") as recorder:
        recorder.client.pending_calls_threshold = 4 * BURST  # publishes awaited at once
        first = [code(f"r{tag}-{i}") for i in range(BURST)]
        issued = await _burst(recorder, first, busy)
        codes_tally = _tally(issued)
        codes = [issued[reply]["result"]["code"] for _, reply, _ in first if issued[reply]["ok"]]

        second = [code(f"s{tag}-{i}") for i in range(BURST)]
        pairs = [pair(f"a{tag}-{i}", c) for i, c in enumerate(codes)]
        both_tally = _tally(await _burst(recorder, [*second, *pairs], busy))
    serve.terminate()
    unreachable = Counter(re.findall(r"redis (?:cluster )?unreachable: (\w+)", serve.output()))
    print(
        f"{backend}: {BURST} codes {dict(codes_tally)}; {len(second)} codes + {len(pairs)} "
        f"pairs {dict(both_tally)}; redis unreachable: {dict(unreachable)}"
    )
    assert codes_tally == {"ok": BURST}, codes_tally
    assert both_tally == {"ok": 2 * BURST}, both_tally
    assert not unreachable, unreachable
