"""`sessions list/revoke` and `codes list/revoke` on real Redis and fakeredis."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from mqtt_pairing.admin import AdminService
from mqtt_pairing.codes import normalise_code
from tests.cli.support import MASKED_RE, Api, Backend, json_lines, one_line_error, run_cli

SESSION_KEYS = [
    "session_id",
    "runner_id",
    "app_id",
    "runner_name",
    "app_name",
    "created_at",
    "last_seen_at",
    "state",
]
CODE_KEYS = [
    "runner_id",
    "code",
    "max_uses",
    "uses_left",
    "created_at",
    "expires_at",
    "expires_in_s",
]


def test_empty_store(backend: Backend) -> None:
    for group, empty in (("sessions", "no active sessions"), ("codes", "no live codes")):
        table = run_cli(group, "list")
        assert table.exit_code == 0, table.output
        assert empty in table.stdout
        assert run_cli(group, "list", "--json").stdout == ""
    revoked = run_cli("sessions", "revoke", "--runner", "r1")
    assert revoked.exit_code == 0
    assert "revoked 0 sessions" in revoked.stdout


async def _three_sessions(api: Api) -> dict[str, str]:
    return {
        "r1-a1": await api.paired("r1", "a1"),
        "r1-a2": await api.paired("r1", "a2"),
        "r2-a1": await api.paired("r2", "a1"),
    }


def test_sessions_by_runner_app_both_and_all(backend: Backend) -> None:
    sid = backend.run(_three_sessions)

    def listed(*args: str) -> set[str]:
        return {s["session_id"] for s in json_lines(run_cli("sessions", "list", *args, "--json"))}

    assert listed() == set(sid.values())
    assert listed("--runner", "r1") == {sid["r1-a1"], sid["r1-a2"]}
    assert listed("--app", "a1") == {sid["r1-a1"], sid["r2-a1"]}
    assert listed("--runner", "r1", "--app", "a1") == {sid["r1-a1"]}
    assert listed("--runner", "nobody") == set()

    lines = json_lines(run_cli("sessions", "list", "--json"))
    assert all(list(line) == SESSION_KEYS for line in lines)
    assert all(line["state"] == "active" for line in lines)
    table = run_cli("sessions", "list", "--runner", "r2").stdout
    assert sid["r2-a1"] in table
    assert sid["r1-a1"] not in table


def test_listing_does_not_refresh_last_seen(backend: Backend) -> None:
    backend.run(lambda api: api.paired("r1", "a1"))
    before = json_lines(run_cli("sessions", "list", "--json"))
    asyncio.run(asyncio.sleep(0.02))
    after = json_lines(run_cli("sessions", "list", "--json"))
    assert before == after


def test_revoke_one_session_writes_the_outbox(backend: Backend) -> None:
    sid = backend.run(_three_sessions)
    revoked = run_cli("sessions", "revoke", sid["r1-a1"])
    assert revoked.exit_code == 0, revoked.output
    assert "runner r1, app a1" in revoked.stdout
    remaining = {s["session_id"] for s in json_lines(run_cli("sessions", "list", "--json"))}
    assert remaining == {sid["r1-a2"], sid["r2-a1"]}

    async def outbox_and_due(api: Api) -> tuple[list[Any], float | None, int]:
        store = api.store
        entries = await store.read_outbox("r1")
        due_key = store.keys.outbox_due(store.keys.shard_of("r1", 1))
        due = await store.client.zscore(due_key, "r1")
        return entries, due, await AdminService(store, api.settings).now_ms()

    entries, due, now = backend.run(outbox_and_due)
    closed = [e for e in entries if e.type == "session.closed"]
    assert len(closed) == 1
    assert closed[0].session is not None
    assert closed[0].session.session_id == sid["r1-a1"]
    assert closed[0].session.closed_reason == "revoked"
    assert due is not None
    assert due <= now  # due at once: a running service publishes it on its next sweep

    line = one_line_error(run_cli("sessions", "revoke", sid["r1-a1"]), 1)
    assert "no active session" in line
    unknown = "3f2b6c1e-8d4a-4c53-9a0e-2b7f1d9c4e55"
    assert "no active session" in one_line_error(run_cli("sessions", "revoke", unknown), 1)


def test_revoke_all_of_a_runner(backend: Backend) -> None:
    sid = backend.run(_three_sessions)
    revoked = run_cli("sessions", "revoke", "--runner", "r1")
    assert revoked.exit_code == 0, revoked.output
    assert "revoked 2 sessions of runner r1" in revoked.stdout
    remaining = {s["session_id"] for s in json_lines(run_cli("sessions", "list", "--json"))}
    assert remaining == {sid["r2-a1"]}
    assert json_lines(run_cli("sessions", "list", "--app", "a2", "--json")) == []


def test_codes_are_listed_masked(backend: Backend) -> None:
    async def issue(api: Api) -> tuple[str, str]:
        return await api.code("r1", max_uses=3, ttl_s=120), await api.code("r2")

    code1, code2 = backend.run(issue)
    lines = json_lines(run_cli("codes", "list", "--json"))
    assert [c["runner_id"] for c in lines] == ["r1", "r2"]
    assert all(list(c) == CODE_KEYS for c in lines)
    first = lines[0]
    assert re.fullmatch(MASKED_RE, first["code"])
    assert first["code"][0] == code1[0]
    assert (first["max_uses"], first["uses_left"]) == (3, 3)
    assert 110 <= first["expires_in_s"] <= 120

    table = run_cli("codes", "list").stdout
    for code in (code1, code2):
        assert code not in table
        assert normalise_code(code) not in table
        assert code[4:7] not in table  # the middle group appears nowhere

    only = json_lines(run_cli("codes", "list", "--runner", "r2", "--json"))
    assert [c["runner_id"] for c in only] == ["r2"]

    backend.run(lambda api: api.pair_ok("a1", code1))
    (after,) = json_lines(run_cli("codes", "list", "--runner", "r1", "--json"))
    assert after["uses_left"] == 2


def test_used_up_and_replaced_codes_are_not_live(backend: Backend) -> None:
    async def use_and_replace(api: Api) -> None:
        await api.paired("r1", "a1")  # used up (max_uses 1)
        await api.code("r2")
        await api.code("r2")  # replaces the first

    backend.run(use_and_replace)
    lines = json_lines(run_cli("codes", "list", "--json"))
    assert [c["runner_id"] for c in lines] == ["r2"]


def test_revoke_a_runners_code(backend: Backend) -> None:
    code = backend.run(lambda api: api.code("r1"))
    revoked = run_cli("codes", "revoke", "--runner", "r1")
    assert revoked.exit_code == 0, revoked.output
    assert json_lines(run_cli("codes", "list", "--json")) == []
    reply = backend.run(lambda api: api.pair("a1", code))
    assert reply["error"]["code"] == "CODE_ALREADY_USED"
    assert "no live code" in one_line_error(run_cli("codes", "revoke", "--runner", "r1"), 1)
    (record,) = json_lines(run_cli("history", "--type", "code.cancelled", "--json"))
    assert record["runner_id"] == "r1"
