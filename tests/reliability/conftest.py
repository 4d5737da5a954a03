"""Fixtures of the reliability tests (issue 6).

Re-exported from `tests/service/conftest.py`: `broker_address`, `start_service`, `peers`,
`sniffer` (all on the session Mosquitto and Redis). Added here:

- `rel_prefix`: a Redis key prefix unique to the test (shared by every instance the test
  starts); `keys` is its `KeySchema`.
- `service_on`: `await service_on(mqtt_url=..., redis_url=..., **overrides)` runs the
  service in-process against any broker and Redis (e.g. private ones a test restarts),
  with the test's topic prefix and `rel_prefix`; stopped after the test, with timeouts.
- `serve_process`: `serve_process(**env)` makes a `ServeProcess` (`python -m mqtt_pairing
  serve`) with the test's prefixes, a free health port and `env` on top; every process
  made is killed after the test.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mqtt_pairing.store.keys import KeySchema
from tests.fixtures import free_port
from tests.reliability.support import SECRET, ServeProcess
from tests.service.conftest import broker_address, peers, sniffer, start_service
from tests.service.support import instance_settings, instances

__all__ = ["broker_address", "peers", "sniffer", "start_service"]

ServiceOn = Callable[..., Any]
MakeServe = Callable[..., ServeProcess]


@pytest.fixture
def rel_prefix() -> str:
    return f"rel-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(rel_prefix: str) -> KeySchema:
    return KeySchema(rel_prefix)


@pytest.fixture
async def service_on(topic_prefix: str, rel_prefix: str) -> AsyncIterator[ServiceOn]:
    """Factory: `await service_on(mqtt_url=..., redis_url=..., **overrides)`."""
    async with instances(instance_settings(topic_prefix, rel_prefix)) as start:
        yield start


@pytest.fixture
def serve_process(topic_prefix: str, rel_prefix: str, tmp_path: Path) -> Iterator[MakeServe]:
    made: list[ServeProcess] = []

    def make(**env: str) -> ServeProcess:
        values = {
            "PAIRING_SECRET": SECRET,
            "PAIRING_TOPIC_PREFIX": topic_prefix,
            "PAIRING_KEY_PREFIX": rel_prefix,
            "PAIRING_SHARED_GROUP": "",
            "PAIRING_HEALTH_LISTEN": f"127.0.0.1:{free_port()}",
            "PAIRING_SHUTDOWN_GRACE_S": "2",
            "MQTT_RECONNECT_MAX_S": "1",
        }
        values.update(env)
        process = ServeProcess(values, tmp_path / f"serve-{len(made)}.log")
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill()
