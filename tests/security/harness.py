"""Harness of the security tests: Mosquitto running broker-config/ as shipped, the service.

- `SecureBroker` (made by the `make_secure_broker` fixture): Mosquitto with the production
  `broker-config/mosquitto.conf` and ACL files (rendered by `mosquitto_conf.py`), whose
  password files are written by `mqtt-pairing credentials add`, so the command is part of
  what is proven. With `tls=TestCA(...)` its commented TLS listeners are enabled too, with
  a server certificate from that CA.
- `running_service(broker, redis_url, key_prefix, **settings)`: the service in-process,
  connected as the `mqtt-pairing` account on the service listener (the shared harness's
  `instances`).
- `Sniffer`: a raw MQTT connection that records every delivery it gets (the shared
  harness's recorder).

The ACLs fix the topic prefix to `pairing`, so tests use it with ids unique to each test
(`uid`) rather than a unique topic prefix.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiomqtt
from typer.testing import CliRunner

from mqtt_pairing.cli.main import app as cli_app
from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import Service
from tests.harness.recorder import RecordingClient
from tests.harness.servers import LOOPBACK, MosquittoBroker, free_port, port_is_open
from tests.harness.service import instances
from tests.security.certs import TestCA
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
        ports: listener port by key: ``runner`` (= `port`), ``app``, ``app-ws``, ``service``,
            and with TLS ``runner-tls``, ``app-tls``, ``app-ws-tls``, ``service-tls``.
        ca: the CA that signed the TLS listeners' certificate, or None.
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
        tls: TestCA | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = tls
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
        keys = ["app", "app-ws", "service"]
        tls_dir = None
        if tls is not None:
            keys += ["runner-tls", "app-tls", "app-ws-tls", "service-tls"]
            tls_dir = directory / "certs"
            tls_dir.mkdir()
            issued = tls.issue("broker", ("localhost", LOOPBACK))
            shutil.copy(issued.cert_file, tls_dir / "server.crt")
            shutil.copy(issued.key_file, tls_dir / "server.key")
        self.ports = {"runner": port, **{key: free_port() for key in keys}}
        template = directory / "mosquitto.conf.template"
        template.write_text(
            render_for_test(conf_dir=self.conf_dir, ports=self.ports, tls_dir=tls_dir)
        )
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
        tls = key.endswith("-tls")
        ws = key.startswith("app-ws")
        return BrokerAddress(
            host=self.host,
            port=self.ports[key],
            transport="websockets" if ws else "tcp",
            tls=tls,
            websocket_path="/mqtt" if ws else None,
            username=ident,
            password=password if password is not None else self.passwords[kind, ident],
            ca_file=str(self.ca.ca_file) if tls and self.ca is not None else None,
        )

    def url(self, listener: str, *, user: str | None = None, password: str | None = None) -> str:
        """The URL of a listener (``mqtts://`` for ``-tls`` ones), with credentials."""
        tls = listener.endswith("-tls")
        if listener.startswith("app-ws"):
            scheme, path = ("wss" if tls else "ws"), "/mqtt"
        else:
            scheme, path = ("mqtts" if tls else "mqtt"), ""
        auth = f"{user}:{password}@" if user is not None else ""
        return f"{scheme}://{auth}{self.host}:{self.ports[listener]}{path}"

    @property
    def service_url(self) -> str:
        password = self.passwords["service", SERVICE_USER]
        return self.url("service", user=SERVICE_USER, password=password)


@contextlib.asynccontextmanager
async def running_service(
    broker: SecureBroker, redis_url: str, key_prefix: str, **overrides: Any
) -> AsyncIterator[Service]:
    """The service in-process, as the `mqtt-pairing` account on the service listener
    (the shared harness's `instances`: a client id of its own, stopped with timeouts)."""
    base: dict[str, Any] = {
        "mqtt_url": broker.service_url,
        "redis_url": redis_url,
        "pairing_secret": PAIRING_SECRET,
        "pairing_topic_prefix": "pairing",
        "pairing_key_prefix": key_prefix.rstrip(":"),
        "pairing_shutdown_grace_s": 2.0,
        "mqtt_reconnect_max_s": 1.0,
    }
    async with instances(base) as start:
        yield (await start(**overrides)).service


class _Recording:
    """Mixed into RunnerClient/AppClient: record every delivery, publish anywhere.

    On the shipped listeners a client id is the username, so an identity has one
    connection at a time: a test that watches what an identity receives, or makes it
    publish forged messages, does it through the identity's own client.
    """

    client: aiomqtt.Client

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received: list[tuple[str, bytes]] = []

    def _handle(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        body = payload if isinstance(payload, bytes | bytearray) else str(payload).encode()
        self.received.append((message.topic.value, bytes(body)))
        super()._handle(message)  # type: ignore[misc]

    async def subscribe(self, filters: Iterable[str]) -> None:
        for topic_filter in filters:
            await self.client.subscribe(topic_filter, qos=1)

    async def publish(self, topic: str, payload: bytes, **kwargs: Any) -> None:
        """Publish at QoS 1 on any topic and wait for the broker's acknowledgement."""
        await self.client.publish(topic, payload, qos=1, **kwargs)

    def topics(self) -> list[str]:
        return [topic for topic, _ in self.received]


class RecordingRunner(_Recording, RunnerClient):
    """A RunnerClient that records every delivery (`received`, `topics()`)."""


class RecordingApp(_Recording, AppClient):
    """An AppClient that records every delivery (`received`, `topics()`)."""


@contextlib.asynccontextmanager
async def runner_client(broker: SecureBroker, ident: str) -> AsyncIterator[RecordingRunner]:
    """A runner with its credentials on the runners listener, its id as client id."""
    address = broker.address("runner", ident)
    async with RecordingRunner(ident, address, client_id=ident) as client:
        yield client


@contextlib.asynccontextmanager
async def app_client(
    broker: SecureBroker, ident: str, *, listener: str = "app"
) -> AsyncIterator[RecordingApp]:
    """An app with its credentials on the apps listener (or ``app-ws``), its id as client
    id."""
    address = broker.address("app", ident, listener=listener)
    async with RecordingApp(ident, address, client_id=ident) as client:
        yield client


class Sniffer(RecordingClient):
    """A raw MQTT connection (as `address` says: where, as whom, TLS) that records every
    delivery: the shared harness's recorder (`subscribe(filters)`, `publish()`,
    `received`, `topics()`), subscribed to nothing yet.

    Args:
        address: where and as whom it connects.
        label: for messages (and the default client id `sniff-<label>-...`).
        v311: speak MQTT 3.1.1 instead of 5.
        persistent: keep the broker session when disconnected, so that the broker goes
            on queueing for it while it is away.
        client_id: the client id it asks for.
    """

    def __init__(
        self,
        address: BrokerAddress,
        label: str,
        *,
        v311: bool = False,
        persistent: bool = False,
        client_id: str | None = None,
    ) -> None:
        super().__init__(
            address,
            label=f"sniff-{label}",
            v311=v311,
            persistent=persistent,
            client_id=client_id,
        )
        self.label = label


__all__ = [
    "PAIRING_SECRET",
    "SERVICE_USER",
    "RecordingApp",
    "RecordingRunner",
    "SecureBroker",
    "Sniffer",
    "add_credentials",
    "app_client",
    "runner_client",
    "running_service",
]
