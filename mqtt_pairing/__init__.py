"""mqtt-pairing: pair runners with mobile apps through an MQTT broker."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
