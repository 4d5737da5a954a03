"""Fixtures of the SDK tests.

Re-exported from `tests/service/conftest.py`: `broker_address`, `start_service`,
`running_service`, `sniffer` (the session Mosquitto and Redis). Added here:

- `sdk`: `SdkPeers`, making `mqtt_pairing.sdk` runners and apps with unique ids on the
  session broker and the test's topic prefix; their broker sessions are ended afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.sdk.support import SdkPeers, sdk_peers
from tests.service.conftest import broker_address, running_service, sniffer, start_service

__all__ = ["broker_address", "running_service", "sniffer", "start_service"]


@pytest.fixture
async def sdk(broker_address: BrokerAddress, topic_prefix: str) -> AsyncIterator[SdkPeers]:
    async with sdk_peers(broker_address, topic_prefix) as made:
        yield made
