"""Shared pieces of the CLI: logging, one-line errors, broker addresses for peers."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import typer

from mqtt_pairing.config import redact_url
from mqtt_pairing.errors import ConfigError
from mqtt_pairing.gateway import BrokerAddress
from mqtt_pairing.logs import LOG_FORMAT, InstanceFilter

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


def peer_address(mqtt_url: str | None) -> BrokerAddress:
    """The broker a simulated peer connects to: `--mqtt-url`, `MQTT_URL`, or 127.0.0.1:1883."""
    url = mqtt_url or os.environ.get("MQTT_URL") or "mqtt://127.0.0.1:1883"
    try:
        return BrokerAddress.from_url(
            url,
            username=os.environ.get("MQTT_USERNAME"),
            password=os.environ.get("MQTT_PASSWORD"),
        )
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


__all__ = ["EXIT_ERROR", "EXIT_USAGE", "fail", "peer_address", "redact_url", "setup_logging"]
