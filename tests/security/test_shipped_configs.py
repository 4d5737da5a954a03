"""Every broker configuration in broker-config/ runs as shipped (issue: no untested files).

- `mosquitto.conf` (plain listeners): every test of tests/security runs it.
- its commented TLS listeners: tests/security/test_tls.py enables and runs them.
- `amqtt.yaml`: here, `serve --broker-config broker-config/amqtt.yaml` pairs a runner and
  an app (the embedded mode: local development only, every client trusted).
- `mosquitto-test.conf`: the template of the other suites' brokers (tests/harness/servers.py).
"""

from __future__ import annotations

import asyncio
import contextlib

from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import build_service
from tests.harness.servers import free_port
from tests.security.mosquitto_conf import BROKER_CONFIG

SHIPPED = {
    "README.md",
    "amqtt.yaml",
    "apps.acl",
    "apps.passwd.example",
    "docker-entrypoint.sh",
    "mosquitto-test.conf",
    "mosquitto.conf",
    "runners.acl",
    "runners.passwd.example",
    "service.acl",
    "service.passwd.example",
}


def test_broker_config_holds_only_files_that_are_tested_or_documented() -> None:
    tracked = {p.name for p in BROKER_CONFIG.iterdir() if not p.name.endswith(".passwd")}
    assert tracked == SHIPPED


async def test_the_embedded_broker_config_pairs_a_runner_and_an_app() -> None:
    port = free_port()
    settings = load_settings(pairing_topic_prefix="pairing")  # no MQTT_URL, no Redis
    service = await build_service(
        settings, listen=f"127.0.0.1:{port}", broker_config=BROKER_CONFIG / "amqtt.yaml"
    )
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.gateway.connected.wait(), 10)
        address = BrokerAddress("127.0.0.1", port)
        async with (
            RunnerClient("r1", address, protocol="3.1.1") as runner,
            AppClient("a1", address, protocol="3.1.1") as app,
        ):
            code = (await runner.request_code())["code"]
            session = (await app.pair(code))["session"]
            assert (session["runner_id"], session["app_id"]) == ("r1", "a1")
            assert [s["session_id"] for s in await runner.sessions()] == [session["session_id"]]
    finally:
        service.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 20)
        await service.close()
