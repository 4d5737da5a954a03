"""The typer application: `serve`, the simulated peers, and (separately) admin commands.

Every error is one line on stderr starting with `error: `, usage errors included, and no
traceback: exit 1 for a domain or runtime error, 2 for bad usage. Commands fail through
`common.fail`; click's own usage errors (unknown option, missing argument, a value of the
wrong type, unknown command) are turned into the same one line by `OneLineErrors`, the
application's root group, so `app()`, `typer.testing.CliRunner` and the console script
behave alike; `main` adds a last line of defence for anything unexpected.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from mqtt_pairing import __version__
from mqtt_pairing.asyncapi_cli import asyncapi
from mqtt_pairing.cli.admin import bans_app, codes_app, history, sessions_app, stats
from mqtt_pairing.cli.common import (
    CLICK_EXCEPTION,
    EXIT_ERROR,
    click_error_line,
    error_line,
    fail,
    one_line,
    setup_logging,
)
from mqtt_pairing.cli.credentials import credentials_app
from mqtt_pairing.cli.peers import app_cli, runner
from mqtt_pairing.config import load_settings
from mqtt_pairing.errors import ConfigError
from mqtt_pairing.sdk.webapp import web
from mqtt_pairing.service import DEFAULT_LISTEN, run_service


class OneLineErrors(TyperGroup):
    """The root group: click's usage errors as one `error:` line instead of a box.

    It runs click in non-standalone mode (click then raises its errors instead of
    rendering them) and does the standalone part itself: print, then exit with the
    error's code (2 for usage).
    """

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,  # noqa: ANN401
    ) -> Any:  # noqa: ANN401
        """Run the command line; see `click.Command.main`."""
        try:
            result = super().main(
                args=args,
                prog_name=prog_name,
                complete_var=complete_var,
                standalone_mode=False,
                **extra,
            )
        except typer.Abort:
            typer.echo(error_line("aborted"), err=True)
            code = EXIT_ERROR
        except CLICK_EXCEPTION as exc:
            code = int(getattr(exc, "exit_code", EXIT_ERROR))
            if type(exc).__name__ == "NoArgsIsHelpError":
                # No arguments: the help is the answer (typer's rich help is already
                # printed when the error is made; plain click's is its message).
                text = exc.format_message()  # type: ignore[attr-defined]
                if text.strip():
                    typer.echo(text)
            else:
                typer.echo(click_error_line(exc), err=True)
        else:
            # Non-standalone click returns the exit code of a `typer.Exit`, else the
            # command's return value (None).
            code = result if isinstance(result, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=OneLineErrors,
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


def main(args: Sequence[str] | None = None) -> None:
    """Console-script entry point: `mqtt-pairing ARGS...` (default: `sys.argv[1:]`).

    Raises:
        SystemExit: always, with the exit code (0, 1 error, 2 usage, 130 interrupted).
    """
    try:
        app(args=args, prog_name="mqtt-pairing")
    except Exception as exc:  # the last line of defence: one line, never a traceback
        detail = one_line(str(exc))[:200]
        typer.echo(error_line(f"unexpected {type(exc).__name__}: {detail}"), err=True)
        sys.exit(EXIT_ERROR)
