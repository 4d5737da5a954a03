"""Fixtures of the security tests (the machinery is in `harness.py`)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator

import pytest

from tests.fixtures import require_binary, start_with_retries
from tests.security.certs import TestCA
from tests.security.harness import SecureBroker


@pytest.fixture
def make_secure_broker(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., SecureBroker]]:
    """Factory: `make_secure_broker(runners=[...], apps=[...], tls=ca)`, stopped after the
    test; with `tls` the shipped TLS listeners are enabled with a certificate of that CA."""
    made: list[SecureBroker] = []

    def make(
        *, runners: Iterable[str] = (), apps: Iterable[str] = (), tls: TestCA | None = None
    ) -> SecureBroker:
        binary = require_binary("mosquitto")
        require_binary("mosquitto_passwd")
        runners, apps = list(runners), list(apps)
        broker = start_with_retries(
            lambda: SecureBroker(
                binary,
                tmp_path_factory.mktemp("mosquitto-secure"),
                runners=runners,
                apps=apps,
                tls=tls,
            )
        )
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


@pytest.fixture
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """A CA made for this test (tests/security/certs.py)."""
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def uid() -> str:
    """A short suffix that makes the ids of one test unique."""
    return uuid.uuid4().hex[:8]
