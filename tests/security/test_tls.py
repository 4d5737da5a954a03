"""TLS means TLS: the shipped TLS listeners, verified by default, and no silent downgrade.

The broker runs broker-config/mosquitto.conf with its commented TLS listeners enabled as
an operator would (tests/security/mosquitto_conf.py), with a server certificate from a CA
made in the test. The service, the simulated peers (`mqtt-pairing app ...`, as a
subprocess) and RunnerClient/AppClient connect with mqtts:// and wss:// URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable

import aiomqtt
import pytest

from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import BrokerAddress, BrokerUnreachable
from mqtt_pairing.service import build_service
from tests.harness.servers import RedisServer
from tests.security.certs import TestCA
from tests.security.harness import (
    PAIRING_SECRET,
    SERVICE_USER,
    SecureBroker,
    running_service,
)
from tests.security.mosquitto_conf import MOSQUITTO_CONF, enable_tls_listeners, parse_listeners

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

TLS_KEYS = ("runner-tls", "app-tls", "app-ws-tls", "service-tls")
KIND_OF = {"runner-tls": "runner", "app-tls": "app", "app-ws-tls": "app", "service-tls": "service"}


def test_the_shipped_tls_listeners_mirror_the_plain_ones() -> None:
    enabled = {
        li.key: li for li in parse_listeners(enable_tls_listeners(MOSQUITTO_CONF.read_text()))
    }
    assert set(TLS_KEYS) <= set(enabled)
    for key in TLS_KEYS:
        tls, plain = enabled[key], enabled[key.removesuffix("-tls")]
        assert tls.options["allow_anonymous"] == "false"
        for option in ("password_file", "acl_file", "protocol", "use_username_as_clientid"):
            assert tls.options.get(option) == plain.options.get(option), (key, option)
        assert tls.options["tls_version"] == "tlsv1.2"


async def can_connect(address: BrokerAddress) -> bool:
    client = aiomqtt.Client(**address.client_options(), identifier="probe", timeout=5)
    try:
        async with client:
            return True
    except aiomqtt.MqttError:
        return False


async def test_pairing_over_tls_listeners_end_to_end(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    test_ca: TestCA,
) -> None:
    runner_id, app_tcp, app_ws = f"r-{uid}", f"a-{uid}", f"w-{uid}"
    broker = make_secure_broker(runners=[runner_id], apps=[app_tcp, app_ws], tls=test_ca)
    # Every TLS listener takes its own kind's credentials only.
    credentials = {
        "runner": (runner_id, broker.passwords["runner", runner_id]),
        "app": (app_tcp, broker.passwords["app", app_tcp]),
        "service": (SERVICE_USER, broker.passwords["service", SERVICE_USER]),
    }
    for listener in TLS_KEYS:
        for kind, (user, password) in credentials.items():
            address = broker.address(kind, user, listener=listener, password=password)
            assert await can_connect(address) == (kind == KIND_OF[listener]), (listener, kind)
    service_url = broker.url(
        "service-tls", user=SERVICE_USER, password=broker.passwords["service", SERVICE_USER]
    )
    async with (
        running_service(
            broker,
            redis_server.url,
            key_prefix,
            mqtt_url=service_url,
            mqtt_ca_file=str(test_ca.ca_file),
        ) as service,
        RunnerClient(
            runner_id, broker.address("runner", runner_id, listener="runner-tls")
        ) as runner,
        AppClient(app_tcp, broker.address("app", app_tcp, listener="app-tls")) as app,
        AppClient(app_ws, broker.address("app", app_ws, listener="app-ws-tls")) as app_over_wss,
    ):
        assert service.gateway.address.tls
        code = (await runner.request_code(max_uses=2))["code"]
        first = (await app.pair(code))["session"]
        second = (await app_over_wss.pair(code))["session"]
        assert {first["app_id"], second["app_id"]} == {app_tcp, app_ws}
        opened: set[str] = set()
        while len(opened) < 2:  # code.used events come too
            event = await runner.next_event()
            if event["event"] == "session.opened":
                opened.add(event["session"]["app_id"])
        assert opened == {app_tcp, app_ws}
        assert len(await runner.sessions()) == 2


async def test_verification_is_on_by_default(
    make_secure_broker: Callable[..., SecureBroker],
    uid: str,
    test_ca: TestCA,
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner_id = f"r-{uid}"
    broker = make_secure_broker(runners=[runner_id], tls=test_ca)
    verified = broker.address("runner", runner_id, listener="runner-tls")
    system_store = BrokerAddress(
        verified.host, verified.port, tls=True, username=runner_id, password=verified.password
    )
    with pytest.raises(BrokerUnreachable) as refused:
        async with RunnerClient(runner_id, system_store):
            pass
    assert str(refused.value).startswith(
        f"TLS certificate of mqtts://127.0.0.1:{verified.port} not accepted ("
    )
    other_ca = TestCA(test_ca.directory.parent / "other-ca", name="another CA")
    wrong_ca = BrokerAddress(
        verified.host,
        verified.port,
        tls=True,
        username=runner_id,
        password=verified.password,
        ca_file=str(other_ca.ca_file),
    )
    with pytest.raises(BrokerUnreachable, match="not accepted"):
        async with RunnerClient(runner_id, wrong_ca):
            pass
    insecure = BrokerAddress(
        verified.host,
        verified.port,
        tls=True,
        username=runner_id,
        password=verified.password,
        tls_insecure=True,
    )
    with caplog.at_level(logging.WARNING, logger="mqtt_pairing.mqtt_address"):
        async with RunnerClient(runner_id, insecure):
            pass
    assert [r.getMessage() for r in caplog.records] == [
        f"TLS certificate verification is OFF for mqtts://127.0.0.1:{verified.port} "
        "(MQTT_TLS_INSECURE / --tls-insecure): anyone on the network path can pose as the "
        "broker and read passwords and codes"
    ]


@pytest.mark.parametrize(("listener", "scheme"), [("app", "mqtts"), ("app-ws", "wss")])
async def test_a_tls_url_at_a_plain_port_fails_and_never_downgrades(
    make_secure_broker: Callable[..., SecureBroker], uid: str, listener: str, scheme: str
) -> None:
    app_id = f"a-{uid}"
    broker = make_secure_broker(apps=[app_id])
    plain = broker.address("app", app_id, listener=listener)
    assert await can_connect(plain)  # the listener itself works, in plain text
    as_tls = BrokerAddress(
        plain.host,
        plain.port,
        transport=plain.transport,
        tls=True,
        username=app_id,
        password=plain.password,
        websocket_path=plain.websocket_path,
    )
    with pytest.raises(BrokerUnreachable) as refused:
        async with AppClient(app_id, as_tls):
            pass
    path = "/mqtt" if listener == "app-ws" else ""
    assert str(refused.value).startswith(
        f"TLS handshake with {scheme}://127.0.0.1:{plain.port}{path} failed ("
    )
    assert str(refused.value).endswith("): is that port a TLS listener?")


def run_peer(*args: str) -> subprocess.CompletedProcess[str]:
    """`mqtt-pairing ARGS` as a separate process, with no MQTT_* from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "PAIRING_"))}
    return subprocess.run(
        [sys.executable, "-m", "mqtt_pairing", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_simulated_peers_use_tls_and_say_why_when_they_cannot(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
    test_ca: TestCA,
) -> None:
    app_id = f"a-{uid}"
    broker = make_secure_broker(apps=[app_id], tls=test_ca)
    password = broker.passwords["app", app_id]
    common = ["app", "sessions", "--id", app_id, "--protocol", "5"]

    def url(listener: str) -> str:
        return broker.url(listener, user=app_id, password=password)

    async with running_service(broker, redis_server.url, key_prefix):
        for listener in ("app-tls", "app-ws-tls"):
            ok = await asyncio.to_thread(
                run_peer, *common, "--mqtt-url", url(listener), "--ca-file", str(test_ca.ca_file)
            )
            assert ok.returncode == 0, ok.stderr
            assert json.loads(ok.stdout) == {"sessions": []}
            assert ok.stderr == ""
            insecure = await asyncio.to_thread(
                run_peer, *common, "--mqtt-url", url(listener), "--tls-insecure"
            )
            assert insecure.returncode == 0, insecure.stderr
            assert len(insecure.stderr.splitlines()) == 1
            assert "TLS certificate verification is OFF" in insecure.stderr
            untrusted = await asyncio.to_thread(run_peer, *common, "--mqtt-url", url(listener))
            assert untrusted.returncode == 1
            assert untrusted.stderr.startswith("error: TLS certificate of ")
            assert len(untrusted.stderr.splitlines()) == 1
        for plain, scheme in (("app", "mqtts"), ("app-ws", "wss")):
            downgrade = url(plain).replace(url(plain).split(":")[0], scheme, 1)
            refused = await asyncio.to_thread(
                run_peer, *common, "--mqtt-url", downgrade, "--ca-file", str(test_ca.ca_file)
            )
            assert refused.returncode == 1, refused.stdout
            assert refused.stderr.startswith(f"error: TLS handshake with {scheme}://127.0.0.1:")
            assert refused.stderr.endswith("is that port a TLS listener?\n")
            assert len(refused.stderr.splitlines()) == 1
            assert password not in refused.stderr
        wrong_option = await asyncio.to_thread(
            run_peer, *common, "--mqtt-url", url("app"), "--ca-file", str(test_ca.ca_file)
        )
        assert wrong_option.returncode == 2
        assert wrong_option.stderr.startswith("error: --mqtt-url is a plain mqtt:// URL")


@pytest.mark.parametrize(
    ("listener", "expected"),
    [
        ("service", "TLS handshake with mqtts://127.0.0.1:{port} failed ("),
        ("service-tls", "TLS certificate of mqtts://127.0.0.1:{port} not accepted ("),
    ],
)
async def test_the_service_logs_a_clear_line_per_failed_attempt(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    test_ca: TestCA,
    caplog: pytest.LogCaptureFixture,
    listener: str,
    expected: str,
) -> None:
    broker = make_secure_broker(tls=test_ca)
    password = broker.passwords["service", SERVICE_USER]
    tls_url = broker.url(listener, user=SERVICE_USER, password=password).replace(
        "mqtt://", "mqtts://"
    )
    settings = load_settings(
        mqtt_url=tls_url,  # no MQTT_CA_FILE: the test CA is not trusted
        redis_url=redis_server.url,
        pairing_secret=PAIRING_SECRET,
        pairing_key_prefix=key_prefix.rstrip(":"),
        mqtt_client_id=f"svc:{key_prefix}",
        mqtt_reconnect_max_s=0.2,
    )
    service = await build_service(settings)
    line = expected.format(port=broker.ports[listener])
    with caplog.at_level(logging.WARNING, logger="mqtt_pairing.gateway"):
        task = asyncio.create_task(service.run())
        try:
            for _ in range(200):  # up to 10 s for three attempts
                attempts = [r for r in caplog.records if line in r.getMessage()]
                if len(attempts) >= 3:
                    break
                await asyncio.sleep(0.05)
            assert len(attempts) >= 3
            assert not service.gateway.connected.is_set()
        finally:
            service.stop()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 20)
            await service.close()
    for record in caplog.records:
        assert password not in record.getMessage()
        assert len(record.getMessage().splitlines()) == 1
