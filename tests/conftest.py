"""The shared harness's fixtures (tests/harness/fixtures.py) for every suite."""

pytest_plugins = ("tests.harness.fixtures",)
