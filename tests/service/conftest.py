"""Fixtures of the end-to-end tests (the service on real Mosquitto + Redis, and its peers).

From the shared harness (tests/harness/fixtures.py): `start_service`, `peers`,
`broker_address`, `recorder`. Added here:

- `running_service`: one service with the default test settings, connected.
- `sniffer`: a recorder of everything (`#`) on the session broker.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.fixtures import broker_address, peers, start_service
from tests.harness.recorder import Checker, Recorder, recording
from tests.harness.service import RunningService, StartService

# Compatibility names: tests/reliability/conftest.py imported these from here.
__all__ = ["broker_address", "peers", "running_service", "sniffer", "start_service"]


@pytest.fixture
async def running_service(start_service: StartService) -> RunningService:
    """A service with the default test settings (no shared group), connected."""
    return await start_service()


@pytest.fixture
async def sniffer(
    broker_address: BrokerAddress, mqtt_checkers: list[Checker]
) -> AsyncIterator[Recorder]:
    """Everything (`#`) on the session broker, copies included (and checked)."""
    async with recording(broker_address, "#", label="sniffer") as recorded:
        for checker in mqtt_checkers:
            recorded.add_checker(checker)
        yield recorded
    recorded.assert_checked()
