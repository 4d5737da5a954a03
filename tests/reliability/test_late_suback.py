"""A SUBACK that comes after its subscribe was given up is one log line, no traceback.

aiomqtt 2.x logs it with `logger.exception` (mqtt_pairing/mqtt_link.py filters it); a
traceback in the service's log fails the crash tests' log checks.
"""

from __future__ import annotations

import inspect
import logging

import aiomqtt.client
import pytest

from mqtt_pairing.mqtt_link import AIOMQTT_LOG


def test_a_late_suback_is_logged_without_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=AIOMQTT_LOG.name)
    try:
        {}.pop(2)
    except KeyError:
        # what aiomqtt's _on_subscribe does for an unknown message id
        AIOMQTT_LOG.exception('Unexpected message ID "%d" in on_subscribe callback', 2)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.exc_info is None
    assert "Traceback" not in caplog.text


def test_aiomqtt_logs_an_unknown_suback_id_as_we_filter_it() -> None:
    # Pins the library behaviour the filter relies on (aiomqtt.Client._on_subscribe).
    source = inspect.getsource(aiomqtt.client.Client._on_subscribe)
    assert 'Unexpected message ID "%d" in on_subscribe callback' in source
