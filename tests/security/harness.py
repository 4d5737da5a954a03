"""Harness of the security tests: Mosquitto running broker-config/ as shipped, the service.

- `SecureBroker` (made by the `make_secure_broker` fixture): Mosquitto with the production
  `broker-config/mosquitto.conf` and ACL files (rendered by `mosquitto_conf.py`), whose
  password files are written by `mqtt-pairing credentials add`, so the command is part of
  what is proven.
- `running_service(broker, redis_url, key_prefix, **settings)`: the service in-process,
  connected as the `mqtt-pairing` account on the service listener.
- `Sniffer`: a raw MQTT 5 connection that records every delivery it gets.

The ACLs fix the topic prefix to `pairing`, so tests use it with ids unique to each test
(`uid`) rather than a unique topic prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiomqtt
from typer.testing import CliRunner

from mqtt_pairing.cli.main import app as cli_app
from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.service import Service, build_service
from tests.fixtures import MosquittoBroker, free_port, port_is_open
from tests.security.mosquitto_conf import BROKER_CONFIG, render_for_test

SERVICE_USER = "mqtt-pairing"
PAIRING_SECRET = "s3cr3t-" + "k" * 40
"""Long enough for PAIRING_SECRET (32 bytes) and easy to search for in logs."""

_KIND_FILE = {"runner": "runners.passwd", "app": "apps.passwd", "service": "service.passwd"}
_cli = CliRunner()


def add_credentials(kind: str, ident: str, password_file: Path) -> str:
    """Run `mqtt-pairing credentials add KIND ID --password-file F`; return the password."""
    result = _cli.invoke(
        cli_app, ["credentials", "add", kind, ident, "--password-file", str(password_file)]
    )
    assert result.exit_code == 0, result.output
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert lines["username"] == ident
    return lines["password"]


class SecureBroker(MosquittoBroker):
    """Mosquitto with broker-config/mosquitto.conf: four listeners, authentication, ACLs.

    Attributes:
        ports: listener port by key: ``runner`` (= `port`), ``app``, ``app-ws``, ``service``.
        passwords: password by (kind, id); the service account is ("service", "mqtt-pairing").
        conf_dir: the directory standing in for /etc/mosquitto/pairing/.
    """

    name = "mosquitto-secure"

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        runners: Iterable[str] = (),
        apps: Iterable[str] = (),
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.conf_dir = directory / "pairing"
        self.conf_dir.mkdir()
        for acl in ("runners.acl", "apps.acl", "service.acl"):
            shutil.copy(BROKER_CONFIG / acl, self.conf_dir / acl)
        self.passwords: dict[tuple[str, str], str] = {}
        identities = [("service", SERVICE_USER)]
        identities += [("runner", r) for r in runners] + [("app", a) for a in apps]
        for kind, ident in identities:
            self.add_identity(kind, ident)
        for name in _KIND_FILE.values():
            (self.conf_dir / name).touch(mode=0o600)
        port = free_port()
        self.ports = {
            "runner": port,
            "app": free_port(),
            "app-ws": free_port(),
            "service": free_port(),
        }
        template = directory / "mosquitto.conf.template"
        template.write_text(render_for_test(conf_dir=self.conf_dir, ports=self.ports))
        super().__init__(binary, directory, port=port, template=template)

    def add_identity(self, kind: str, ident: str) -> str:
        """Provision one identity with the credentials command (reload to apply)."""
        password = add_credentials(kind, ident, self.password_file(kind))
        self.passwords[kind, ident] = password
        return password

    def password_file(self, kind: str) -> Path:
        return self.conf_dir / _KIND_FILE[kind]

    def reload(self) -> None:
        """SIGHUP: Mosquitto rereads password and ACL files."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def is_ready(self) -> bool:
        return all(port_is_open(self.host, p) for p in self.ports.values())

    def address(
        self,
        kind: str,
        ident: str,
        *,
        listener: str | None = None,
        password: str | None = None,
    ) -> BrokerAddress:
        """Where `ident` of `kind` connects (its own listener unless `listener` says)."""
        key = listener or kind
        return BrokerAddress(
            host=self.host,
            port=self.ports[key],
            transport="websockets" if key == "app-ws" else "tcp",
            websocket_path="/mqtt" if key == "app-ws" else None,
            username=ident,
            password=password if password is not None else self.passwords[kind, ident],
        )

    @property
    def service_url(self) -> str:
        password = self.passwords["service", SERVICE_USER]
        return f"mqtt://{SERVICE_USER}:{password}@{self.host}:{self.ports['service']}"


@contextlib.asynccontextmanager
async def running_service(
    broker: SecureBroker, redis_url: str, key_prefix: str, **overrides: Any
) -> AsyncIterator[Service]:
    """The service in-process, as the `mqtt-pairing` account on the service listener."""
    tag = uuid.uuid4().hex[:10]
    settings = load_settings(
        mqtt_url=broker.service_url,
        redis_url=redis_url,
        pairing_secret=PAIRING_SECRET,
        pairing_topic_prefix="pairing",
        pairing_key_prefix=key_prefix.rstrip(":"),
        mqtt_client_id=f"svc:{tag}",
        **overrides,
    )
    service = await build_service(settings)
    task = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(service.gateway.connected.wait(), 10)
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 20)
        await service.close()


@contextlib.asynccontextmanager
async def runner_client(broker: SecureBroker, ident: str) -> AsyncIterator[RunnerClient]:
    """A RunnerClient with its credentials, on the runners listener."""
    async with RunnerClient(ident, broker.address("runner", ident)) as client:
        yield client


@contextlib.asynccontextmanager
async def app_client(
    broker: SecureBroker, ident: str, *, listener: str = "app"
) -> AsyncIterator[AppClient]:
    """An AppClient with its credentials, on the apps listener (or ``app-ws``)."""
    async with AppClient(ident, broker.address("app", ident, listener=listener)) as client:
        yield client


class Sniffer:
    """A raw MQTT 5 connection that subscribes to filters and records every delivery."""

    def __init__(self, address: BrokerAddress, label: str) -> None:
        self.label = label
        self.received: list[tuple[str, bytes]] = []
        self.client = aiomqtt.Client(
            address.host,
            address.port,
            username=address.username,
            password=address.password,
            identifier=f"sniff-{label}-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            transport=address.transport,
            websocket_path=address.websocket_path,
            socket_options=[NODELAY],
            timeout=10,
        )
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Sniffer:
        await self.client.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self.client.messages:
            payload = message.payload
            body = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
            self.received.append((message.topic.value, bytes(body)))

    async def subscribe(self, filters: Iterable[str]) -> None:
        for topic_filter in filters:
            await self.client.subscribe(topic_filter, qos=1)

    async def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        await self.client.publish(topic, payload, qos=1, **kwargs)

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.received]


__all__ = [
    "PAIRING_SECRET",
    "SERVICE_USER",
    "SecureBroker",
    "Sniffer",
    "add_credentials",
    "app_client",
    "runner_client",
    "running_service",
]
