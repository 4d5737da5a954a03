"""The per-client token buckets of the flood guard (gateway.TokenBuckets).

Bounded whatever the number of clients (a fleet of runners heartbeating is tens of
thousands), least recently seen forgotten first, and a client seen recently keeps its
state: an emptied bucket stays empty however many other clients come meanwhile.
"""

from __future__ import annotations

from mqtt_pairing import gateway
from mqtt_pairing.gateway import TokenBuckets


async def test_the_buckets_stay_bounded_however_many_clients_come_at_once() -> None:
    buckets = TokenBuckets(rate=100, capacity=200)
    for i in range(3 * gateway._MAX_FLOOD_STATE):
        assert buckets.take(f"runner-{i}")
    assert len(buckets._buckets) <= gateway._MAX_FLOOD_STATE


async def test_a_recent_flooder_stays_limited_while_others_come_and_go() -> None:
    buckets = TokenBuckets(rate=0.001, capacity=5)
    taken = [buckets.take("flooder") for _ in range(10)]
    assert taken == [True] * 5 + [False] * 5
    for i in range(3 * gateway._MAX_FLOOD_STATE):
        buckets.take(f"other-{i}")
        if i % 100 == 0:
            assert not buckets.take("flooder")  # seen again: never forgotten meanwhile
    assert not buckets.take("flooder")
