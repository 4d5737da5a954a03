"""Shared pieces of the CLI: logging, one-line errors, broker addresses for peers."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, NoReturn

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


def one_line(text: str) -> str:
    """`text` with every run of whitespace (newlines and tabs included) made one space."""
    return " ".join(text.split())


def error_line(message: str) -> str:
    """The one line every CLI error prints on stderr: ``error: <message>``."""
    return f"error: {one_line(message)}"


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one line on stderr and exit with `code` (no traceback)."""
    typer.echo(error_line(message), err=True)
    raise typer.Exit(code)


def _click_base(name: str) -> type[Exception]:
    """One of click's exception classes, found through the one typer re-exports.

    typer keeps click inside itself (recent versions carry a copy at `typer._click`, older
    ones import `click`) and re-exports `typer.BadParameter` only, a subclass of click's
    `UsageError` and `ClickException`. Looking the bases up by name keeps this module off
    either private path; tests/cli/test_usage_errors.py pins it.
    """
    for base in typer.BadParameter.__mro__:
        if base.__name__ == name and issubclass(base, Exception):
            return base
    raise ImportError(f"typer.BadParameter does not derive from click's {name}")


CLICK_EXCEPTION = _click_base("ClickException")
"""click's `ClickException`: usage errors and the like, with `exit_code` and `format_message()`."""

USAGE_ERROR = _click_base("UsageError")
"""click's `UsageError` (exit code 2): a bad option, argument or command; has `ctx`."""


def click_error_line(exc: Exception) -> str:
    """The one line for a click exception, with where to find help for a usage error.

    click's own rendering is a usage line, a hint and the message (typer draws them in a
    box): five lines or more, and no `error:`. This keeps the message and the hint only.
    """
    message: str = exc.format_message()  # type: ignore[attr-defined]
    message = one_line(message)
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx: Any = getattr(exc, "ctx", None)
    if isinstance(exc, USAGE_ERROR) and ctx is not None:
        message = f"{message.removesuffix('.')} (see '{ctx.command_path} --help')"
    return error_line(message)


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


__all__ = [
    "CLICK_EXCEPTION",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "USAGE_ERROR",
    "click_error_line",
    "error_line",
    "fail",
    "one_line",
    "peer_address",
    "redact_url",
    "setup_logging",
]
