"""Harness of the security tests: Mosquitto running broker-config/ as shipped, the service.

- `SecureBroker` (made by the `make_secure_broker` fixture): Mosquitto with the production
  `broker-config/mosquitto.conf` and ACL files (rendered by `mosquitto_conf.py`), whose
  password files are written by `mqtt-pairing credentials add`, so the command is part of
  what is proven.
- `running_service(broker, redis_url, key_prefix, **settings)`: the service in-process,
  connected as the `mqtt-pairing` account on the service listener (the shared harness's
  `instances`).
- `Sniffer`: a raw MQTT 5 connection that records every delivery it gets (the shared
  harness's recorder).

The ACLs fix the topic prefix to `pairing`, so tests use it with ids unique to each test
(`uid`) rather than a unique topic prefix.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from mqtt_pairing.cli.main import app as cli_app
from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.gateway import BrokerAddress
from mqtt_pairing.service import Service
from tests.harness.recorder import Recorder, recording
from tests.harness.servers import MosquittoBroker, free_port, port_is_open
from tests.harness.service import instance_settings, instances
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
    """The service in-process, as the `mqtt-pairing` account on the service listener
    (the shared harness's `instances`, tests/harness/service.py)."""
    base = instance_settings(
        "pairing",
        key_prefix.rstrip(":"),
        mqtt_url=broker.service_url,
        redis_url=redis_url,
        pairing_secret=PAIRING_SECRET,
        pairing_shared_group=f"g{uuid.uuid4().hex[:10]}",
    )
    async with instances(base) as start:
        yield (await start(**overrides)).service


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


def Sniffer(address: BrokerAddress, label: str) -> contextlib.AbstractAsyncContextManager[Recorder]:  # noqa: N802 - was a class
    """A raw MQTT 5 connection (with `address`'s credentials) that records every delivery:
    the shared harness's recorder (`.subscribe(filters)`, `.publish()`, `.received`,
    `.topics()`), subscribed to nothing yet."""
    return recording(address, label=f"sniff-{label}")


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
