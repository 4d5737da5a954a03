"""The `mqtt-pairing` command line (typer): serve, simulated peers and admin commands.

Exit codes: 0 success, 1 a domain or runtime error (one line on stderr), 2 bad usage.
"""

from __future__ import annotations

from mqtt_pairing.cli.main import app, main

__all__ = ["app", "main"]
