"""Bad usage, missing settings and an unreachable Redis: one line on stderr, right exit code."""

from __future__ import annotations

import pytest

from mqtt_pairing.cli.admin import When, parse_duration_s, parse_when
from tests.cli.support import one_line_error as error_line
from tests.cli.support import run_cli
from tests.harness.servers import RedisServer, free_port

EXIT_ERROR = 1
EXIT_USAGE = 2

# Every admin command, with arguments that would be valid.
COMMANDS: list[list[str]] = [
    ["history"],
    ["history", "--runner", "r1", "--since", "1h"],
    ["bans", "list"],
    ["bans", "add", "app", "a1", "--for", "30m"],
    ["bans", "remove", "runner", "r1"],
    ["bans", "allow", "app", "a1"],
    ["bans", "disallow", "app", "a1"],
    ["sessions", "list"],
    ["sessions", "revoke", "3f2b6c1e-8d4a-4c53-9a0e-2b7f1d9c4e55"],
    ["sessions", "revoke", "--runner", "r1"],
    ["codes", "list", "--runner", "r1"],
    ["codes", "revoke", "--runner", "r1"],
    ["stats", "--window", "1h"],
]

HELP_PATHS = [
    ["history"],
    ["bans", "list"],
    ["bans", "add"],
    ["bans", "remove"],
    ["bans", "allow"],
    ["bans", "disallow"],
    ["sessions", "list"],
    ["sessions", "revoke"],
    ["codes", "list"],
    ["codes", "revoke"],
    ["stats"],
]

# (command with a placeholder for the id, where the id goes)
ID_SLOTS: list[list[str]] = [
    ["history", "--runner", "{}"],
    ["history", "--app", "{}"],
    ["bans", "add", "app", "{}"],
    ["bans", "add", "runner", "{}"],
    ["bans", "remove", "app", "{}"],
    ["bans", "allow", "runner", "{}"],
    ["bans", "disallow", "app", "{}"],
    ["sessions", "list", "--runner", "{}"],
    ["sessions", "list", "--app", "{}"],
    ["sessions", "revoke", "{}"],
    ["sessions", "revoke", "--runner", "{}"],
    ["codes", "list", "--runner", "{}"],
    ["codes", "revoke", "--runner", "{}"],
]
BAD_IDS = ["bad/id#", "", "x" * 65]


@pytest.mark.parametrize("path", HELP_PATHS, ids=" ".join)
def test_every_command_has_help_with_examples(clean_env: None, path: list[str]) -> None:
    result = run_cli(*path, "--help")
    assert result.exit_code == 0, result.output
    assert f"mqtt-pairing {' '.join(path)}" in result.stdout


def test_groups_list_their_commands(clean_env: None) -> None:
    top = run_cli("--help")
    for name in ("history", "bans", "sessions", "codes", "stats"):
        assert name in top.stdout
    bans = run_cli("bans", "--help")
    for name in ("add", "list", "remove", "allow", "disallow"):
        assert name in bans.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_no_redis_setting_says_what_to_set(clean_env: None, command: list[str]) -> None:
    line = error_line(run_cli(*command), EXIT_USAGE)
    assert "REDIS_URL" in line
    assert "REDIS_HOST" in line


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_unreachable_redis_is_one_line(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    line = error_line(run_cli(*command), EXIT_ERROR)
    assert "unreachable" in line
    assert "hunter2" not in line


def test_redis_host_group_is_used(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setenv("REDIS_HOST", "127.0.0.1")
    monkeypatch.setenv("REDIS_PORT", str(port))
    line = error_line(run_cli("bans", "list"), EXIT_ERROR)
    assert f"127.0.0.1:{port}" in line


def test_bad_setting_is_one_line(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis")
    monkeypatch.setenv("REDIS_PORT", "tcp://10.0.0.5:6379")
    line = error_line(run_cli("sessions", "list"), EXIT_USAGE)
    assert "REDIS_PORT" in line


def test_malformed_redis_url_is_one_line(clean_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "http://127.0.0.1:6379")
    line = error_line(run_cli("codes", "list"), EXIT_USAGE)
    assert "REDIS_URL" in line


@pytest.mark.parametrize("bad", BAD_IDS, ids=["slash-hash", "empty", "65-chars"])
@pytest.mark.parametrize("template", ID_SLOTS, ids=" ".join)
def test_invalid_ids_are_refused(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, template: list[str], bad: str
) -> None:
    # Refused before any connection: the URL points nowhere.
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    args = [bad if part == "{}" else part for part in template]
    line = error_line(run_cli(*args), EXIT_USAGE)
    assert "not a valid id" in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["bans", "add", "device", "a1"], "KIND"),
        (["bans", "add", "app", "a1", "--for", "30"], "--for"),
        (["bans", "add", "app", "a1", "--for", "0m"], "--for"),
        (["bans", "add", "app", "a1", "--for", "soon"], "--for"),
        (["bans", "add", "app", "a1", "--reason", "x" * 201], "--reason"),
        (["bans", "add", "app", "a1", "--reason", "line\nbreak"], "--reason"),
        (["history", "--type", "pair.maybe"], "--type"),
        (["history", "--since", "yesterday"], "--since"),
        (["history", "--until", "2026-13-45"], "--until"),
        (["history", "--limit", "0"], "--limit"),
        (["history", "--limit", "10001"], "--limit"),
        (["history", "--before", "not-a-cursor"], "--before"),
        (["sessions", "revoke"], "SESSION_ID"),
        (["sessions", "revoke", "s1", "--runner", "r1"], "SESSION_ID"),
        (["codes", "revoke"], "--runner"),
        (["stats", "--window", "permanent"], "--window"),
        (["stats", "--window", "1y"], "--window"),
    ],
)
def test_bad_usage_is_one_line(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert needle in error_line(run_cli(*args), EXIT_USAGE)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86_400), ("1w", 604_800), ("2H", 7200)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration_s(text) == seconds


@pytest.mark.parametrize("bad", [".dot-first", "white space", "ü-umlaut", "a\n"])
def test_other_malformed_ids(clean_env: None, bad: str) -> None:
    line = error_line(run_cli("sessions", "list", "--runner", bad), EXIT_USAGE)
    assert "not a valid id" in line


def test_permanent_only_where_allowed() -> None:
    assert parse_duration_s("permanent", allow_permanent=True) is None
    with pytest.raises(ValueError):
        parse_duration_s("permanent")


def test_times_relative_and_absolute() -> None:
    now = 1_800_000_000_000
    assert parse_when("1h").resolve(now) == now - 3_600_000
    assert parse_when("now").resolve(now) == now
    assert parse_when("2026-11-29T12:00:00Z") == When(at_ms=1_795_953_600_000)
    assert parse_when("2026-11-29T13:00:00+01:00") == When(at_ms=1_795_953_600_000)
    assert parse_when("2026-11-29T12:00:00") == When(at_ms=1_795_953_600_000)  # naive: UTC
    assert parse_when("2026-11-29") == When(at_ms=1_795_910_400_000)


def test_wrong_redis_credentials_are_one_line(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    host, port = redis_server.host, redis_server.port
    monkeypatch.setenv("REDIS_URL", f"redis://nobody:wrong-one@{host}:{port}/0")
    line = error_line(run_cli("sessions", "revoke", "--runner", "r1"), EXIT_ERROR)
    assert "credentials" in line
    assert "wrong-one" not in line
