"""Helpers of the admin CLI tests: the CLI runner, and a service side without MQTT.

`Backend` drives a `Dispatcher` on the test's Redis and key prefix, as the gateway would
(including the history records it appends), so the admin commands find real data.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from typer.testing import CliRunner, Result

from mqtt_pairing.admin import AdminService
from mqtt_pairing.cli.main import app
from mqtt_pairing.config import Settings, load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from tests.harness.api import Api as HarnessApi
from tests.harness.api import new_id

T = TypeVar("T")

__all__ = ["Api", "Backend", "json_lines", "new_id", "one_line_error", "run_cli"]
SECRET = b"s" * 32

MASKED_RE = r"^[0-9A-HJKMNP-TV-Z]\*\*-\*\*\*-\*\*\* #[0-9a-f]{8}$"


def run_cli(*args: str) -> Result:
    """Invoke `mqtt-pairing ARGS...`; exceptions other than exits fail the test."""
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def json_lines(result: Result) -> list[dict[str, Any]]:
    """The stdout of a `--json` command, one object per line."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def one_line_error(result: Result, code: int) -> str:
    """Assert the command failed with `code`, one line on stderr and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


class Api(HarnessApi):
    """Requests through a Dispatcher, recording history as the gateway does."""

    record_history = True


@dataclass
class Backend:
    """The service side of a CLI test, on the same Redis URL and key prefix."""

    url: str
    prefix: str
    overrides: dict[str, Any]

    def settings(self) -> Settings:
        return load_settings(redis_url=self.url, pairing_key_prefix=self.prefix, **self.overrides)

    def run(self, work: Callable[[Api], Awaitable[T]]) -> T:
        """Run `work(api)` in a fresh event loop (the CLI runs its own, in turn)."""

        async def main() -> T:
            store = PairingStore(connect_redis(self.url), KeySchema(self.prefix))
            try:
                return await work(Api(Dispatcher(store, self.settings(), SECRET)))
            finally:
                await store.aclose()

        return asyncio.run(main())

    def admin(self, work: Callable[[AdminService], Awaitable[T]]) -> T:
        """Run `work(admin)` against the same Redis."""

        async def main() -> T:
            store = PairingStore(connect_redis(self.url), KeySchema(self.prefix))
            try:
                return await work(AdminService(store, self.settings(), actor="test"))
            finally:
                await store.aclose()

        return asyncio.run(main())
