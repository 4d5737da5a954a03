"""`bans add/list/remove/allow/disallow` on real Redis and fakeredis."""

from __future__ import annotations

from typing import Any

import pytest

from mqtt_pairing.broker import InMemoryRedis
from mqtt_pairing.topics import Kind
from tests.cli.support import Api, Backend, json_lines, one_line_error, run_cli

BAN_KEYS = [
    "type",
    "kind",
    "id",
    "reason",
    "by",
    "at",
    "until",
    "permanent",
    "remaining_s",
    "strikes",
]


def test_empty_store_lists_nothing(backend: Backend) -> None:
    table = run_cli("bans", "list")
    assert table.exit_code == 0, table.output
    assert "no bans" in table.stdout
    as_json = run_cli("bans", "list", "--json")
    assert as_json.exit_code == 0
    assert as_json.stdout == ""


def test_ban_with_length_and_reason_is_listed(backend: Backend) -> None:
    added = run_cli(
        "bans", "add", "app", "a1", "--for", "30m", "--reason", "guessing codes", "--by", "ops"
    )
    assert added.exit_code == 0, added.output
    assert "banned app a1 for 30m" in added.stdout
    run_cli("bans", "add", "runner", "r1")  # permanent by default

    listed = json_lines(run_cli("bans", "list", "--json"))
    assert [list(line) for line in listed] == [BAN_KEYS, BAN_KEYS]
    app_ban, runner_ban = listed
    assert app_ban["type"] == "ban"
    assert (app_ban["kind"], app_ban["id"]) == ("app", "a1")
    assert app_ban["reason"] == "guessing codes"
    assert app_ban["by"] == "ops"
    assert app_ban["permanent"] is False
    assert 1790 <= app_ban["remaining_s"] <= 1800
    assert app_ban["until"].endswith("Z")
    assert app_ban["strikes"] is None
    assert (runner_ban["kind"], runner_ban["id"]) == ("runner", "r1")
    assert runner_ban["permanent"] is True
    assert runner_ban["until"] is None
    assert runner_ban["remaining_s"] is None

    table = run_cli("bans", "list")
    assert "guessing codes" in table.stdout
    assert "permanent" in table.stdout


def test_banning_again_replaces_the_ban(backend: Backend) -> None:
    run_cli("bans", "add", "app", "a1", "--for", "1d")
    again = run_cli("bans", "add", "app", "a1", "--for", "2h", "--reason", "shorter")
    assert "replaces" in again.stdout
    (ban,) = json_lines(run_cli("bans", "list", "--json"))
    assert ban["reason"] == "shorter"
    assert ban["remaining_s"] <= 7200


def test_remove_lifts_a_ban_and_is_an_error_when_none(backend: Backend) -> None:
    run_cli("bans", "add", "app", "a1")
    removed = run_cli("bans", "remove", "app", "a1")
    assert removed.exit_code == 0, removed.output
    assert "lifted the ban of app a1" in removed.stdout
    assert json_lines(run_cli("bans", "list", "--json")) == []
    line = one_line_error(run_cli("bans", "remove", "app", "a1"), 1)
    assert "neither banned nor penalised" in line


def test_runner_ban_cancels_its_code(backend: Backend) -> None:
    code = backend.run(lambda api: api.code("r1"))
    assert len(json_lines(run_cli("codes", "list", "--json"))) == 1
    assert run_cli("bans", "add", "runner", "r1", "--for", "1h").exit_code == 0
    assert json_lines(run_cli("codes", "list", "--json")) == []

    async def pair_and_code(api: Api) -> tuple[dict[str, Any], dict[str, Any]]:
        return await api.pair("a1", code), await api.request(Kind.RUNNER, "r1", "code")

    paired, new_code = backend.run(pair_and_code)
    assert paired["error"]["code"] == "CODE_ALREADY_USED"
    assert new_code["error"]["code"] == "BANNED"
    events = [e["event"] for e in json_lines(run_cli("history", "--runner", "r1", "--json"))]
    assert events[:2] == ["code.cancelled", "ban.added"]


async def _fail_guesses(api: Api, app_id: str, count: int) -> list[str]:
    codes = []
    for _ in range(count):
        reply = await api.pair(app_id, "000-000-000")
        codes.append(reply["error"]["code"])
    return codes


def test_automatic_penalty_is_listed_and_can_be_lifted(backend: Backend) -> None:
    outcomes = backend.run(lambda api: _fail_guesses(api, "a1", 6))
    assert outcomes == ["CODE_NOT_FOUND"] * 5 + ["RATE_LIMITED"]

    (penalty,) = json_lines(run_cli("bans", "list", "--json"))
    assert penalty["type"] == "penalty"
    assert (penalty["kind"], penalty["id"]) == ("app", "a1")
    assert penalty["strikes"] == 1
    assert 290 <= penalty["remaining_s"] <= 300
    assert penalty["until"] is not None
    assert "penalty" in run_cli("bans", "list").stdout

    lifted = run_cli("bans", "remove", "app", "a1")
    assert lifted.exit_code == 0, lifted.output
    assert "penalty" in lifted.stdout
    assert json_lines(run_cli("bans", "list", "--json")) == []
    # Lifted within one request: the next guess is looked up again.
    assert backend.run(lambda api: _fail_guesses(api, "a1", 1)) == ["CODE_NOT_FOUND"]
    removed = json_lines(run_cli("history", "--app", "a1", "--type", "ban.removed", "--json"))
    assert len(removed) == 1
    assert "lifted=penalty" in removed[0]["detail"]


def test_allowlist(backend: Backend) -> None:
    allowed = run_cli("bans", "allow", "app", "qa-01")
    assert allowed.exit_code == 0, allowed.output
    assert "is now on the allowlist" in allowed.stdout
    assert "already" in run_cli("bans", "allow", "app", "qa-01").stdout
    (entry,) = json_lines(run_cli("bans", "list", "--json"))
    assert (entry["type"], entry["kind"], entry["id"]) == ("allowed", "app", "qa-01")

    # No automatic penalty for an allowlisted app.
    outcomes = backend.run(lambda api: _fail_guesses(api, "qa-01", 7))
    assert outcomes == ["CODE_NOT_FOUND"] * 7

    assert run_cli("bans", "disallow", "app", "qa-01").exit_code == 0
    assert json_lines(run_cli("bans", "list", "--json")) == []
    line = one_line_error(run_cli("bans", "disallow", "app", "qa-01"), 1)
    assert "not on the allowlist" in line


def test_cli_ban_refuses_the_very_next_pair(backend: Backend) -> None:
    code = backend.run(lambda api: api.code("r1", max_uses=2))

    assert run_cli("bans", "add", "app", "a1", "--for", "30m").exit_code == 0
    reply = backend.run(lambda api: api.pair("a1", code))
    assert reply["error"]["code"] == "BANNED"
    assert 1790 <= reply["error"]["retry_after_s"] <= 1800

    assert run_cli("bans", "add", "app", "a1", "--for", "permanent").exit_code == 0
    reply = backend.run(lambda api: api.pair("a1", code))
    assert reply["error"]["code"] == "BANNED"
    assert "retry_after_s" not in reply["error"]

    # Others are not affected, and lifting the ban works on the next request too.
    assert backend.run(lambda api: api.pair("a2", code))["ok"]
    assert run_cli("bans", "remove", "app", "a1").exit_code == 0
    assert backend.run(lambda api: api.pair("a1", code))["ok"]


def test_works_against_the_embedded_in_memory_store(
    clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = InMemoryRedis()
    memory.start()
    try:
        monkeypatch.setenv("REDIS_URL", memory.url)  # what `serve` prints in embedded mode
        assert run_cli("bans", "add", "app", "a1", "--reason", "test").exit_code == 0
        (ban,) = json_lines(run_cli("bans", "list", "--json"))
        assert (ban["id"], ban["permanent"]) == ("a1", True)
        assert run_cli("sessions", "list").exit_code == 0
        assert run_cli("stats", "--json").exit_code == 0
    finally:
        memory.stop()
