"""`mqtt-pairing asyncapi`: write or check the AsyncAPI document (docs/sdk.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mqtt_pairing.asyncapi import render_yaml
from mqtt_pairing.cli.common import fail


def asyncapi(
    out: Annotated[
        Path | None, typer.Option("--out", help="Write it to this file (default: stdout).")
    ] = None,
    check: Annotated[
        Path | None,
        typer.Option("--check", help="Exit 1 if this file differs from what would be written."),
    ] = None,
) -> None:
    """Print the AsyncAPI 3.0 document of the wire protocol, generated from the code.

    For example:

        mqtt-pairing asyncapi --out docs/asyncapi.yaml

        mqtt-pairing asyncapi --check docs/asyncapi.yaml
    """
    text = render_yaml()
    if check is not None:
        try:
            current = check.read_text("utf-8")
        except OSError as exc:
            fail(f"cannot read {check}: {exc.strerror}")
        if current != text:
            fail(f"{check} is out of date: run `mqtt-pairing asyncapi --out {check}`")
        typer.echo(f"{check} is up to date")
        return
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text, "utf-8")
