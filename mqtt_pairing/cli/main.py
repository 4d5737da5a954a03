"""The typer application: `serve`, the simulated peers, and (separately) admin commands."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from mqtt_pairing import __version__
from mqtt_pairing.asyncapi_cli import asyncapi
from mqtt_pairing.cli.admin import bans_app, codes_app, history, sessions_app, stats
from mqtt_pairing.cli.common import fail, setup_logging
from mqtt_pairing.cli.credentials import credentials_app
from mqtt_pairing.cli.peers import app_cli, runner
from mqtt_pairing.config import load_settings
from mqtt_pairing.errors import ConfigError
from mqtt_pairing.sdk.webapp import web
from mqtt_pairing.service import DEFAULT_LISTEN, run_service

app = typer.Typer(
    name="mqtt-pairing",
    help="Pair runners with mobile apps through an MQTT broker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("runner")(runner)
app.add_typer(app_cli, name="app")
app.add_typer(credentials_app, name="credentials")
app.command("history")(history)
app.add_typer(bans_app, name="bans")
app.add_typer(sessions_app, name="sessions")
app.add_typer(codes_app, name="codes")
app.command("stats")(stats)
app.command("asyncapi")(asyncapi)
app.command("web")(web)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Pair runners with mobile apps through an MQTT broker."""


@app.command()
def serve(
    listen: Annotated[
        str,
        typer.Option("--listen", help="HOST:PORT of the embedded broker (only without MQTT_URL)."),
    ] = DEFAULT_LISTEN,
    broker_config: Annotated[
        Path | None,
        typer.Option("--broker-config", help="amqtt YAML for the embedded broker."),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING.")] = "INFO",
) -> None:
    r"""Run the pairing service.

    With no MQTT_URL it starts the embedded broker (amqtt) on --listen, and with no Redis
    setting the in-memory store; settings come from the environment (see the README).
    For example:

        mqtt-pairing serve --listen 127.0.0.1:18830

        MQTT_URL=mqtt://svc:pw@broker:1883 REDIS_URL=redis://redis:6379/0 \\
        PAIRING_SECRET=... mqtt-pairing serve
    """
    setup_logging(log_level)
    try:
        settings = load_settings()
        code = asyncio.run(run_service(settings, listen=listen, broker_config=broker_config))
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()
