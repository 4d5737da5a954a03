"""Helpers of the end-to-end tests: waiting for events, checking their envelopes.

The service, its peers and the recorder come from the shared harness (tests/harness/);
the names below them are kept for tests written before it (compatibility names:
`RunningService`, `StartService`, `start_running`, `instance_settings`, `instances`,
`Peers`, `Sniffer`, `Seen`, `sniffing`).
"""

from __future__ import annotations

import contextlib
import re
from datetime import UTC, datetime
from typing import Any

import pytest

from mqtt_pairing.client import PairingClient
from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.peers import Peers
from tests.harness.recorder import Message, Recorder, recording
from tests.harness.service import (
    SECRET,
    RunningService,
    StartService,
    instance_settings,
    instances,
    start_running,
)

REPLY_TIMEOUT_S = 5.0
EVENT_TIMEOUT_S = 5.0

CODE_RE = re.compile(r"^[0-9A-HJKMNP-TV-Z]{3}-[0-9A-HJKMNP-TV-Z]{3}-[0-9A-HJKMNP-TV-Z]{3}$")
TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def parse_ts(value: str) -> datetime:
    """An RFC 3339 UTC timestamp with milliseconds, as the protocol writes them."""
    assert TIMESTAMP_RE.fullmatch(value), value
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def events(client: PairingClient, count: int) -> list[dict[str, Any]]:
    """The next `count` events of `client` (in arrival order)."""
    return [await client.next_event(EVENT_TIMEOUT_S) for _ in range(count)]


async def no_more_events(client: PairingClient, wait_s: float = 0.3) -> None:
    """Assert that no further event arrives within `wait_s`."""
    with contextlib.suppress(TimeoutError):
        extra = await client.next_event(wait_s)
        pytest.fail(f"unexpected event: {extra}")


def by_event(received: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped by their `event` name."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for event in received:
        grouped.setdefault(event["event"], []).append(event)
    return grouped


def check_event_envelope(event: dict[str, Any]) -> None:
    """Every event has an event_id and an `at` timestamp."""
    assert isinstance(event["event_id"], str)
    assert event["event_id"]
    parse_ts(event["at"])


Sniffer = Recorder
Seen = Message


def sniffing(
    address: BrokerAddress, *filters: str
) -> contextlib.AbstractAsyncContextManager[Recorder]:
    """A recorder subscribed (QoS 1) to `filters`, ready when entered."""
    return recording(address, *filters, label="sniffer")


__all__ = [
    "CODE_RE",
    "SECRET",
    "TIMESTAMP_RE",
    "Peers",
    "RunningService",
    "Seen",
    "Sniffer",
    "StartService",
    "by_event",
    "check_event_envelope",
    "events",
    "instance_settings",
    "instances",
    "no_more_events",
    "parse_ts",
    "sniffing",
    "start_running",
]
