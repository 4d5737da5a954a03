"""Compatibility name: the server machinery moved to `tests/harness/servers.py`.

Kept while other branches and `benchmarks/` still import `tests.fixtures`; new code
imports `tests.harness.servers` (and uses the fixtures of `tests/harness/fixtures.py`).
"""

from tests.harness.servers import *  # noqa: F403
