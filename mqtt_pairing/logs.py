"""Log lines that name the instance, so that the logs of several instances can be merged.

`serve` sets the instance id once the gateway has one (`set_instance`); every record then
carries it as `%(instance)s` (`-` before that, and in the admin commands).
"""

from __future__ import annotations

import logging

_instance = "-"

LOG_FORMAT = "%(asctime)s %(levelname)s %(instance)s %(name)s: %(message)s"
"""The format of `serve` and the other commands (see `mqtt_pairing.cli.common`)."""


def set_instance(instance_id: str) -> None:
    """Name this process's instance in every log record from now on."""
    global _instance  # noqa: PLW0603 - one process, one instance
    _instance = instance_id


class InstanceFilter(logging.Filter):
    """Adds `record.instance` (the instance id, or `-`) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always True: it only annotates."""
        record.instance = _instance
        return True
