"""`python -m mqtt_pairing`: the same as the `mqtt-pairing` command."""

from __future__ import annotations

from mqtt_pairing.cli import main

main()
