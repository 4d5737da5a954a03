"""Health endpoints through real faults (issue 6, "Health").

With `PAIRING_HEALTH_LISTEN` on a free port: `/livez` is 200 throughout; `/readyz` is 200
when the broker and Redis are reachable, 503 (with the reason) while Redis is stopped or
frozen or the broker is down, and 200 again once they are back, without a restart. Exit
codes of `serve` are tested in tests/service/test_cli_serve.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

from tests.harness.servers import MosquittoBroker, RedisServer, free_port
from tests.reliability.conftest import ServiceOn
from tests.reliability.support import http_get, report


async def test_readiness_follows_redis_and_the_broker(
    make_redis_server: Callable[..., RedisServer],
    make_mosquitto: Callable[..., MosquittoBroker],
    service_on: ServiceOn,
) -> None:
    redis_server = make_redis_server()
    broker = make_mosquitto()
    running = await service_on(
        mqtt_url=broker.url,
        redis_url=redis_server.url,
        pairing_health_listen=f"127.0.0.1:{free_port()}",
    )
    health = running.service.health
    assert health is not None
    host, port = health.host, health.port
    loop = asyncio.get_running_loop()

    async def status(path: str) -> tuple[int, object]:
        return await http_get(host, port, path)

    async def wait_ready(expected: int, timeout_s: float = 15.0) -> tuple[float, object]:
        """Seconds until /readyz answers `expected`, and its body then."""
        started = loop.time()
        while True:
            code, body = await status("/readyz")
            if code == expected:
                return loop.time() - started, body
            assert loop.time() - started < timeout_s, (code, body)
            await asyncio.sleep(0.05)

    assert await status("/livez") == (200, {"status": "ok"})
    assert await status("/readyz") == (200, {"status": "ok"})
    assert (await status("/nope"))[0] == 404

    # Redis stopped: not ready (the reason says why), still alive; ready again after.
    await asyncio.to_thread(redis_server.stop)
    redis_down_s, body = await wait_ready(503)
    assert body == {"status": "redis unreachable"}
    assert (await status("/livez"))[0] == 200
    await asyncio.to_thread(redis_server.start)
    redis_back_s, _ = await wait_ready(200)

    # Redis frozen (SIGSTOP): PING times out; /readyz must still answer, and quickly.
    pid = redis_server.process.pid if redis_server.process else 0
    os.kill(pid, signal.SIGSTOP)
    try:
        started = loop.time()
        code, body = await status("/readyz")
        frozen_probe_s = loop.time() - started
        assert (code, body) == (503, {"status": "redis unreachable"})
        assert frozen_probe_s < 5.0
        assert (await status("/livez"))[0] == 200
    finally:
        os.kill(pid, signal.SIGCONT)
    frozen_back_s, _ = await wait_ready(200)

    # The broker down: not ready; ready again once the gateway has reconnected.
    await asyncio.to_thread(broker.stop)
    broker_down_s, body = await wait_ready(503)
    assert body == {"status": "broker not connected"}
    assert (await status("/livez"))[0] == 200
    await asyncio.to_thread(broker.start)
    broker_back_s, _ = await wait_ready(200)

    running.assert_serving()
    report(
        "health",
        redis_down_to_503_s=f"{redis_down_s:.2f}",
        redis_back_to_200_s=f"{redis_back_s:.2f}",
        frozen_redis_probe_s=f"{frozen_probe_s:.2f}",
        after_freeze_200_s=f"{frozen_back_s:.2f}",
        broker_down_to_503_s=f"{broker_down_s:.2f}",
        broker_back_to_200_s=f"{broker_back_s:.2f}",
    )
