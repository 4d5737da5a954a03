"""Embedded mode: the amqtt broker in-process and the in-memory store on a local port.

With no `MQTT_URL`, `serve` runs amqtt (MQTT 3.1.1 only; no shared subscriptions, so one
instance) on `--listen` (127.0.0.1:1883). With no Redis setting, the store is fakeredis,
running the same Lua scripts, served on a free local port (`TcpFakeServer`) so admin
commands can reach it through the `REDIS_URL` that `serve` prints.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, cast

import fakeredis
import yaml
from amqtt.broker import Broker

from mqtt_pairing.errors import ConfigError

log = logging.getLogger(__name__)


def parse_listen(value: str) -> tuple[str, int]:
    """Parse `HOST:PORT` (IPv6 in brackets: `[::1]:1883`).

    Raises:
        ConfigError: not HOST:PORT with a port in 1-65535.
    """
    host, sep, port_text = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError("--listen: expected HOST:PORT, e.g. 127.0.0.1:1883")
    return host, int(port_text)


def check_port_free(host: str, port: int) -> None:
    """Fail early and clearly when the listen address is taken.

    Raises:
        ConfigError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"--listen: cannot listen on {host}:{port} ({exc.strerror or exc}); "
                "pick another with --listen HOST:PORT"
            ) from None


def broker_config(host: str, port: int, config_file: Path | None = None) -> dict[str, Any]:
    """The amqtt configuration: `config_file` (YAML) if given, else anonymous on host:port.

    The listener's bind address always comes from `--listen`.

    Raises:
        ConfigError: the file cannot be read or is not a YAML mapping.
    """
    config: dict[str, Any] = {
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }
    if config_file is not None:
        try:
            loaded = yaml.safe_load(config_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"--broker-config: cannot read {config_file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--broker-config: {config_file} is not a YAML mapping")
        config = loaded
    listeners = dict(config.get("listeners") or {})
    default = dict(listeners.get("default") or {"type": "tcp"})
    default["bind"] = f"{host}:{port}"
    listeners["default"] = default
    config["listeners"] = listeners
    return config


async def start_embedded_broker(host: str, port: int, config_file: Path | None = None) -> Broker:
    """Start amqtt in this process on host:port.

    Raises:
        ConfigError: the port is taken or the configuration is bad.
    """
    check_port_free(host, port)
    broker = Broker(broker_config(host, port, config_file))
    try:
        await broker.start()
    except Exception as exc:  # amqtt raises its own BrokerError and plain OSErrors
        raise ConfigError(f"embedded broker failed to start on {host}:{port}: {exc}") from None
    return broker


def without_nagle(server: socketserver.BaseServer) -> None:
    """Set TCP_NODELAY on a socketserver's connections (`disable_nagle_algorithm`).

    fakeredis's TCP server writes each reply of a pipeline on its own; with Nagle's
    algorithm on, every pipeline then waits ~40 ms for a delayed ACK (docs/design.md: "Nagle's
    algorithm costs about 40 ms per hop on loopback").
    """
    handler = cast(type[socketserver.StreamRequestHandler], server.RequestHandlerClass)
    server.RequestHandlerClass = type(
        "NoDelay" + handler.__name__, (handler,), {"disable_nagle_algorithm": True}
    )


class InMemoryRedis:
    """fakeredis served on a free local port from a thread (the embedded store).

    Attributes:
        url: the `REDIS_URL` of the in-memory store.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        with socket.socket() as sock:
            sock.bind((host, 0))
            self.port = int(sock.getsockname()[1])
        self.host = host
        self.server = fakeredis.TcpFakeServer((host, self.port), server_type="redis")
        without_nagle(self.server)
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="in-memory-redis",
            daemon=True,
        )

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
