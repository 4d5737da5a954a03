"""Fixtures of the reliability tests (issue 6).

From the shared harness (tests/harness/fixtures.py): `broker_address`, `start_service`,
`peers`, `recorder`, `serve_process` (`serve_process(**env)` makes a `ServeProcess` with
the test's prefixes, the session servers unless `env` says otherwise, and a free health
port; every process made is killed after the test). `sniffer` is tests/service's. Here:

- `rel_prefix`: the Redis key prefix every instance of the test shares (the harness's
  `service_key_prefix`); `keys` is its `KeySchema`.
- `service_on`: `await service_on(mqtt_url=..., redis_url=..., **overrides)` runs the
  service in-process against any broker and Redis (e.g. private ones a test restarts),
  with the test's topic prefix and `rel_prefix`; stopped after the test, with timeouts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mqtt_pairing.store.keys import KeySchema
from tests.harness.fixtures import MakeServe, broker_address, peers, start_service
from tests.harness.service import instance_settings, instances
from tests.service.conftest import sniffer

# Compatibility names: tests import these from here.
__all__ = ["MakeServe", "ServiceOn", "broker_address", "peers", "sniffer", "start_service"]

ServiceOn = Callable[..., Any]


@pytest.fixture
def rel_prefix(service_key_prefix: str) -> str:
    return service_key_prefix


@pytest.fixture
def keys(rel_prefix: str) -> KeySchema:
    return KeySchema(rel_prefix)


@pytest.fixture
async def service_on(topic_prefix: str, rel_prefix: str) -> AsyncIterator[ServiceOn]:
    """Factory: `await service_on(mqtt_url=..., redis_url=..., **overrides)`."""
    async with instances(instance_settings(topic_prefix, rel_prefix)) as start:
        yield start
