"""Fixtures of the admin CLI tests.

- `prefix`: the test's unique key prefix (no trailing colon).
- `clean_env`: no MQTT_*, REDIS_* or PAIRING_* variable from the outer environment.
- `admin_env`: `REDIS_URL` (real Redis, then fakeredis) and `PAIRING_KEY_PREFIX` set as
  an operator would; returns the URL.
- `backend`: the service side (a Dispatcher) on that Redis and prefix.
"""

from __future__ import annotations

import os

import pytest

from tests.cli.support import Backend


@pytest.fixture
def prefix(key_prefix: str) -> str:
    return key_prefix.rstrip(":")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("MQTT_", "REDIS_", "PAIRING_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture
def admin_env(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, store_redis_url: str, prefix: str
) -> str:
    monkeypatch.setenv("REDIS_URL", store_redis_url)
    monkeypatch.setenv("PAIRING_KEY_PREFIX", prefix)
    return store_redis_url


@pytest.fixture
def backend(admin_env: str, prefix: str) -> Backend:
    return Backend(admin_env, prefix, {})
