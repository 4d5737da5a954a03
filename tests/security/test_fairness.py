"""One client's flood does not starve the others (`PAIRING_MAX_INFLIGHT_PER_CLIENT`).

An app publishes 2,000 requests at once (with `mosquitto_pub`); another app's requests,
sent after them, must all be answered within `VICTIM_TIMEOUT_S`. Redis sits behind a
proxy that delays every command by `REDIS_DELAY_S` (a Redis across a slow network), and
the service holds 64 requests in flight, so each handled request costs time, as it does
at scale. Before the per-client bound, the flood filled the window and the broker's
queue ahead of the other app: its requests waited for all 2,000. With it, the flooder
has at most `PER_CLIENT` requests handled at a time and its excess is answered
RATE_LIMITED with `retry_after_s` at once, without Redis, up to `PER_CLIENT` such
replies a second; the rest is dropped without a reply (tests/security/test_flood.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Callable

import pytest

from mqtt_pairing.gateway import SLOW_DOWN_S
from tests.harness.servers import RedisServer, require_binary
from tests.harness.waiting import wait_until
from tests.security.harness import SecureBroker, Sniffer, app_client, running_service

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

FLOOD = 2000
VICTIM_REQUESTS = 4  # as many as PER_CLIENT: all of them in flight at once
MAX_INFLIGHT = 64
PER_CLIENT = 4
assert VICTIM_REQUESTS <= PER_CLIENT
REDIS_DELAY_S = 0.8
VICTIM_TIMEOUT_S = 15.0
"""How long the other app's requests may take. Without the per-client bound they wait
for the whole flood: 2,000 requests, 64 at a time, each at least one Redis round trip
through the proxy: about 30 s (16 s measured with a 0.4 s delay on a loaded machine).
With it the flood is shed at the speed the service reads messages: about 5 s on a
loaded 2-core machine (the same run), a second or two on an idle one."""


@contextlib.asynccontextmanager
async def delaying_proxy(host: str, port: int, delay_s: float) -> AsyncIterator[int]:
    """A loopback TCP proxy that holds every chunk sent to `host:port` for `delay_s`."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await src.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                dst.write(data)
                await dst.drain()
        dst.transport.abort()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.transport.abort()
            return
        await asyncio.gather(pump(reader, up_writer, delay_s), pump(up_reader, writer, 0))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_a_flooding_client_does_not_starve_another(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    flooder, victim = f"flood-{uid}", f"victim-{uid}"
    broker = make_secure_broker(apps=[flooder, victim])
    async with (
        delaying_proxy(redis_server.host, redis_server.port, REDIS_DELAY_S) as port,
        running_service(
            broker,
            f"redis://127.0.0.1:{port}/0",
            key_prefix,
            pairing_max_inflight=MAX_INFLIGHT,
            pairing_max_inflight_per_client=PER_CLIENT,
            redis_timeout_s=10.0,
        ) as service,
        app_client(broker, victim) as app,
    ):
        # The flood from another process (mosquitto_pub, QoS 1, one message a line), so
        # that only the service competes with this test's event loop.
        lines = "".join(json.dumps({"request_id": f"f{n}"}) + "\n" for n in range(FLOOD))
        done = await asyncio.to_thread(
            subprocess.run,
            [
                require_binary("mosquitto_pub"),
                *("-h", broker.host, "-p", str(broker.ports["app"])),
                *("-u", flooder, "-P", broker.passwords["app", flooder]),
                *("-V", "mqttv5", "-q", "1", "-l"),
                *("-t", f"pairing/apps/{flooder}/req/sessions"),
            ],
            input=lines.encode(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        # Every flood request is at the broker, ahead of the victim's.
        loop = asyncio.get_running_loop()

        async def timed(n: int) -> float:
            started = loop.time()
            reply = await app.request(
                "sessions", {"request_id": f"v{n}"}, timeout_s=VICTIM_TIMEOUT_S
            )
            assert reply["ok"], reply
            return loop.time() - started

        counters = service.gateway.counters
        dispatcher = service.gateway.dispatcher
        try:
            latencies = await asyncio.gather(*(timed(n) for n in range(VICTIM_REQUESTS)))
        except TimeoutError:
            handled = dispatcher.replies["sessions", "ok"]
            pytest.fail(
                f"a request of the other app waited more than {VICTIM_TIMEOUT_S} s behind the "
                f"flood ({handled} handled and {counters['shed']} shed of {FLOOD} by then)"
            )
        assert max(latencies) < VICTIM_TIMEOUT_S
        # Every flood request is accounted for: handled, shed, or (past its client's
        # RATE_LIMITED replies a second) dropped without a reply.
        await wait_until(
            lambda: (
                dispatcher.replies["sessions", "ok"] + counters["shed"] + counters["dropped.flood"]
                >= FLOOD + VICTIM_REQUESTS
            ),
            120,
            "every flood request handled, shed or dropped",
        )
        assert counters["shed"] > 0
        await asyncio.sleep(1.0)  # the flooder's RATE_LIMITED replies a second refill

        # What a shed request gets: RATE_LIMITED with retry_after_s, at once.
        async with Sniffer(broker.address("app", flooder), flooder, client_id=flooder) as flood:
            await flood.subscribe([f"pairing/apps/{flooder}/res/+"])
            burst = 2 * PER_CLIENT  # PER_CLIENT handled, PER_CLIENT answered RATE_LIMITED
            await asyncio.gather(
                *(
                    flood.publish(
                        f"pairing/apps/{flooder}/req/sessions",
                        json.dumps({"request_id": f"b{n}"}).encode(),
                    )
                    for n in range(burst)
                )
            )
            await wait_until(lambda: len(flood.received) >= burst, 30, "the burst's replies")
        replies = [json.loads(body) for _, body in flood.received]
        assert sorted(r["request_id"] for r in replies) == sorted(f"b{n}" for n in range(burst))
        shed = [r for r in replies if not r["ok"]]
        assert shed, replies
        assert {(r["error"]["code"], r["error"]["retry_after_s"]) for r in shed} == {
            ("RATE_LIMITED", SLOW_DOWN_S)
        }
