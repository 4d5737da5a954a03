"""Fixtures of the security tests (the machinery is in `harness.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from tests.security.certs import TestCA
from tests.security.harness import SecureBroker


@pytest.fixture
def make_secure_broker(
    make_shipped_mosquitto: Callable[..., SecureBroker],
) -> Callable[..., SecureBroker]:
    """Factory: `make_secure_broker(runners=[...], apps=[...], tls=ca)`, stopped after the
    test; with `tls` the shipped TLS listeners are enabled with a certificate of that CA
    (the shared harness's `make_shipped_mosquitto`)."""
    return make_shipped_mosquitto


@pytest.fixture
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A CA made for this test (tests/security/certs.py)."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def uid() -> str:
    """A short suffix that makes the ids of one test unique."""
    return uuid.uuid4().hex[:8]
