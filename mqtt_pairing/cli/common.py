"""Shared pieces of the CLI: logging, one-line errors, broker addresses for peers."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import typer

from mqtt_pairing.config import redact_url
from mqtt_pairing.errors import ConfigError
from mqtt_pairing.logs import LOG_FORMAT, InstanceFilter
from mqtt_pairing.mqtt_address import BrokerAddress

EXIT_ERROR = 1
EXIT_USAGE = 2


def setup_logging(level: str) -> None:
    """Plain log lines on stderr, naming the instance; amqtt's chatter only from WARNING up."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(InstanceFilter())
    for noisy in ("amqtt", "transitions", "passlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one line on stderr and exit with `code` (no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


_TRUE = frozenset({"1", "true", "yes", "on"})


def peer_address(
    mqtt_url: str | None, *, ca_file: str | None = None, tls_insecure: bool = False
) -> BrokerAddress:
    """The broker a simulated peer connects to: `--mqtt-url`, `MQTT_URL`, or 127.0.0.1:1883.

    `--ca-file` and `--tls-insecure` fall back to `MQTT_CA_FILE` and `MQTT_TLS_INSECURE`;
    a usage error (exit 2) is one line.
    """
    url = mqtt_url or os.environ.get("MQTT_URL") or "mqtt://127.0.0.1:1883"
    ca_file = ca_file or os.environ.get("MQTT_CA_FILE") or None
    insecure = tls_insecure or os.environ.get("MQTT_TLS_INSECURE", "").lower() in _TRUE
    try:
        return BrokerAddress.from_url(
            url,
            username=os.environ.get("MQTT_USERNAME"),
            password=os.environ.get("MQTT_PASSWORD"),
            ca_file=ca_file,
            tls_insecure=insecure,
            setting="--mqtt-url" if mqtt_url else "MQTT_URL",
            ca_setting="--ca-file",
        )
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


__all__ = ["EXIT_ERROR", "EXIT_USAGE", "fail", "peer_address", "redact_url", "setup_logging"]
