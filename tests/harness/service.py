"""The service in-process: built by `build_service`, run in a task of the test's loop.

- `instance_settings(topic_prefix, key_prefix, **values)`: what every test instance starts
  from (a secret, the prefixes, no shared group, short grace and reconnect times).
- `instances(base)`: an async context; `await start(**overrides)` runs one more instance
  (a client id of its own, never one a runner or app could hold) and every instance is
  stopped, with timeouts, when the context ends.
- `RunningService`: the running instance, its counters, `assert_serving()`, `stop()`.

The fixtures that use them (`start_service`, ...) are in `tests/harness/fixtures.py`;
`tests/harness/serve.py` runs the service as a process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mqtt_pairing.config import Settings, load_settings
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import Service, build_service

SECRET = "x" * 40
CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def service_client_id() -> str:
    """A client id for one test instance: unique, and with a `:`, which no runner or app
    id can hold (the service's ids never match the id pattern)."""
    return f"test-svc:{uuid.uuid4().hex[:12]}"


@dataclass
class RunningService:
    """A service running in a task of the test's event loop."""

    service: Service
    task: asyncio.Task[None]
    address: BrokerAddress
    prefix: str

    @property
    def settings(self) -> Settings:
        return self.service.settings

    @property
    def counters(self) -> Any:
        """The dispatcher's counters (`status` counts recorded status messages)."""
        return self.service.gateway.dispatcher.counters

    @property
    def dropped(self) -> int:
        """How many request messages the gateway dropped for their topic."""
        counters = self.service.gateway.counters
        return sum(n for name, n in counters.items() if name.startswith("dropped."))

    def assert_serving(self) -> None:
        """The service task is still running (a bad message did not end it)."""
        assert not self.task.done(), self.task
        assert self.service.gateway.connected.is_set()

    async def stop(self) -> None:
        """Stop serving and release everything."""
        if not self.task.done():
            self.service.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self.task), STOP_TIMEOUT_S)
            except TimeoutError:
                self.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.task
                await self.service.close()
                raise
        await asyncio.wait_for(self.service.close(), STOP_TIMEOUT_S)


StartService = Callable[..., Awaitable[RunningService]]
"""`await start_service(**setting_overrides)` (setting names in lower case)."""


async def start_running(service: Service, address: BrokerAddress, prefix: str) -> RunningService:
    """Run `service` in a task and wait (bounded) until it is connected and subscribed."""
    task = asyncio.create_task(service.run())
    running = RunningService(service, task, address, prefix)
    connected = asyncio.ensure_future(service.gateway.connected.wait())
    done, _ = await asyncio.wait(
        {connected, task}, timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if connected not in done:
        connected.cancel()
        await running.stop()
        pytest.fail(f"the service did not connect within {CONNECT_TIMEOUT_S} s")
    return running


async def run_service(service: Service) -> RunningService:
    """`start_running` with the service's own address and topic prefix."""
    gateway = service.gateway
    return await start_running(service, gateway.address, gateway.settings.pairing_topic_prefix)


def instance_settings(topic_prefix: str, key_prefix: str, **values: Any) -> dict[str, Any]:
    """The settings every test service starts from, `values` on top: the secret, the
    prefixes, no shared group, and short grace and reconnect times (bounded stops)."""
    return {
        "pairing_secret": SECRET,
        "pairing_topic_prefix": topic_prefix,
        "pairing_key_prefix": key_prefix,
        "pairing_shared_group": "",
        "pairing_shutdown_grace_s": 2.0,
        "mqtt_reconnect_max_s": 1.0,
        **values,
    }


@contextlib.asynccontextmanager
async def instances(base: dict[str, Any]) -> AsyncIterator[StartService]:
    """`await start(**overrides)` runs one more service with `base` and `overrides` as its
    settings (and a client id of its own) until the context ends. Every instance is
    stopped then, the others too if one fails to stop."""
    started: list[RunningService] = []

    async def start(**overrides: Any) -> RunningService:
        values = {**base, "mqtt_client_id": service_client_id(), **overrides}
        service = await build_service(load_settings(**values))
        address = BrokerAddress.from_url(values["mqtt_url"])
        running = await start_running(service, address, values["pairing_topic_prefix"])
        started.append(running)
        return running

    failed = False
    try:
        yield start
    except BaseException:
        failed = True
        raise
    finally:
        # Also when the body failed: a service left running keeps its Redis connections
        # open until the garbage collector finds them, in some later test.
        errors: list[Exception] = []
        for running in reversed(started):
            try:
                await running.stop()
            except Exception as exc:  # stop the others first, then report
                errors.append(exc)
        if errors and not failed:  # the body's own failure is the one to see
            raise errors[0]
