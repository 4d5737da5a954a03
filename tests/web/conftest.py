"""Fixtures of the browser test: re-exported from tests/security/conftest.py."""

from tests.security.conftest import make_secure_broker

__all__ = ["make_secure_broker"]
