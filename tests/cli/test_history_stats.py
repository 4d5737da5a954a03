"""`history` (filters, cursor paging over > 10k entries) and `stats`."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from mqtt_pairing.admin import AdminService, HistoryRecord
from mqtt_pairing.models import PairingHistoryEntry
from tests.cli.support import MASKED_RE, Api, Backend, json_lines, run_cli

HISTORY_KEYS = [
    "id",
    "cursor",
    "at",
    "event",
    "runner_id",
    "app_id",
    "session_id",
    "code",
    "error_code",
    "detail",
]
STATS_KEYS = [
    "window_s",
    "from",
    "to",
    "pairs_succeeded",
    "pairs_failed",
    "pairs_failed_by_code",
    "codes_issued",
    "bans_added",
    "penalties",
    "sessions_closed",
    "active_sessions",
    "live_codes",
    "active_bans",
    "active_penalties",
    "allowlisted",
    "global_failure_budget",
]
EVENTS = ("pair.succeeded", "pair.failed", "code.issued", "session.opened")


async def _activity(api: Api) -> dict[str, str]:
    sid = await api.paired("r1", "a1")
    await api.pair("a2", "000-000-000")
    await api.pair("a2", "ZZZ-ZZZ-ZZZ")
    replaced = await api.code("r2")
    await api.pair_ok("a2", await api.code("r2"))
    await api.pair("a3", replaced)
    return {"session": sid}


def test_empty_store(backend: Backend) -> None:
    table = run_cli("history")
    assert table.exit_code == 0, table.output
    assert "no history entries" in table.stdout
    assert run_cli("history", "--json").stdout == ""
    (stats,) = json_lines(run_cli("stats", "--json"))
    assert list(stats) == STATS_KEYS
    assert stats["pairs_succeeded"] == 0
    assert stats["pairs_failed_by_code"] == {}
    assert stats["active_sessions"] == stats["live_codes"] == 0
    assert stats["global_failure_budget"] == {"in_use": 0, "limit": 600, "window_s": 60}
    assert run_cli("stats").exit_code == 0


def test_history_by_runner_app_and_type(backend: Backend) -> None:
    ids = backend.run(_activity)

    everything = json_lines(run_cli("history", "--json"))
    assert all(list(line) == HISTORY_KEYS for line in everything)
    stamps = [line["id"] for line in everything]
    assert stamps == sorted(stamps, key=lambda s: tuple(map(int, s.split("-"))), reverse=True)
    for line in everything:
        if line["code"] is not None:
            assert re.fullmatch(MASKED_RE, line["code"]), line

    r1 = json_lines(run_cli("history", "--runner", "r1", "--json"))
    # A pair is one record, pair.succeeded, naming its session (the runner's is written
    # with the open).
    assert [e["event"] for e in r1] == ["pair.succeeded", "code.issued"]
    assert r1[0]["session_id"] == ids["session"]
    assert r1[0]["app_id"] == "a1"
    assert re.fullmatch(MASKED_RE, r1[0]["code"])

    failed = json_lines(run_cli("history", "--app", "a2", "--type", "pair.failed", "--json"))
    assert [e["error_code"] for e in failed] == ["CODE_NOT_FOUND", "CODE_NOT_FOUND"]
    a3 = json_lines(run_cli("history", "--app", "a3", "--json"))
    assert [(e["event"], e["error_code"], e["runner_id"]) for e in a3] == [
        ("pair.failed", "CODE_ALREADY_USED", None)
    ]
    both = json_lines(run_cli("history", "--runner", "r2", "--app", "a2", "--json"))
    assert [e["event"] for e in both] == ["pair.succeeded"]
    two_types = json_lines(
        run_cli("history", "--type", "pair.succeeded", "--type", "code.issued", "--json")
    )
    assert {e["event"] for e in two_types} == {"pair.succeeded", "code.issued"}
    assert len(two_types) == 5

    table = run_cli("history", "--runner", "r1")
    assert "pair.succeeded" in table.stdout
    assert ids["session"] in table.stdout


def test_since_and_until_are_inclusive(backend: Backend) -> None:
    backend.run(_activity)
    everything = json_lines(run_cli("history", "--json"))
    middle = everything[len(everything) // 2]["at"]
    newer = json_lines(run_cli("history", "--since", middle, "--json"))
    older = json_lines(run_cli("history", "--until", middle, "--json"))
    assert all(e["at"] >= middle for e in newer)
    assert all(e["at"] <= middle for e in older)
    assert {e["id"] for e in newer} | {e["id"] for e in older} == {e["id"] for e in everything}
    assert json_lines(run_cli("history", "--since", "1h", "--json")) == everything
    assert json_lines(run_cli("history", "--until", "1h", "--json")) == []


def test_table_gives_the_next_cursor(backend: Backend) -> None:
    backend.run(_activity)
    first = run_cli("history", "--limit", "2")
    hint = first.stderr.strip()
    assert hint.startswith("more: --before ")
    cursor = hint.removeprefix("more: --before ")
    rest = json_lines(run_cli("history", "--before", cursor, "--json"))
    whole = json_lines(run_cli("history", "--json"))
    assert [e["id"] for e in rest] == [e["id"] for e in whole[2:]]
    assert "more:" not in run_cli("history", "--limit", "100").stderr


TOTAL = 10_500
PER_MS = 3  # entries sharing a millisecond: cursors must break ties


async def _base_ms(api: Api) -> int:
    """A minute ago, Redis time."""
    return await AdminService(api.store, api.settings).now_ms() - 60_000


async def _write_entries(
    api: Api, key: str, total: int, fields: Callable[[int], dict[str, str]], base_ms: int
) -> None:
    """XADD `total` entries with explicit ids, `PER_MS` per millisecond from `base_ms`."""
    client = api.store.client
    for start in range(0, total, 2000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(start + 2000, total)):
            pipe.xadd(key, fields(i), id=f"{base_ms + i // PER_MS}-{i % PER_MS}")  # type: ignore[arg-type]
        await pipe.execute()


def _page_through(*args: str, limit: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor: list[str] = []
    while True:
        result = run_cli("history", *args, "--limit", str(limit), *cursor, "--json")
        assert result.exit_code == 0, result.output
        page = json_lines(result)
        assert len(page) <= limit
        if not page:
            return seen
        seen.extend(page)
        cursor = ["--before", page[-1]["cursor"]]


def _check_paging(backend: Backend, total: int, own_total: int) -> None:
    def entry(i: int) -> dict[str, str]:
        return {"event": EVENTS[i % 4], "runner_id": f"r{i % 5}", "detail": f"n={i}"}

    def own(i: int) -> dict[str, str]:
        return {"event": EVENTS[i % 4], "runner_id": "r1", "detail": f"own={i}"}

    async def seed(api: Api) -> None:
        base = await _base_ms(api)
        await _write_entries(api, api.store.keys.history_global(0), total, entry, base)
        # Only in r1's own stream: `--runner` must read it, not the global history.
        await _write_entries(api, api.store.keys.history("runner", "r1"), own_total, own, base)

    backend.run(seed)
    seen = _page_through(limit=1000)
    numbers = [int(e["detail"].removeprefix("n=")) for e in seen]
    assert numbers == list(range(total - 1, -1, -1))

    mine = _page_through("--runner", "r1", limit=450)
    assert [e["detail"] for e in mine] == [f"own={i}" for i in range(own_total - 1, -1, -1)]

    failed = _page_through("--runner", "r1", "--type", "pair.failed", limit=70)
    assert [e["detail"] for e in failed] == [
        f"own={i}" for i in range(own_total - 1, -1, -1) if i % 4 == 1
    ]


def test_paging_over_10k_entries_has_no_duplicate_and_no_gap(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, redis_url: str, prefix: str
) -> None:
    # Real Redis only: fakeredis takes seconds per thousand XADDs (paged below as well).
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("PAIRING_KEY_PREFIX", prefix)
    _check_paging(Backend(redis_url, prefix, {}), TOTAL, 1_000)


def test_paging_has_no_duplicate_and_no_gap(backend: Backend) -> None:
    _check_paging(backend, 1_200, 300)


def test_paging_merges_global_shards_with_equal_ids(backend: Backend) -> None:
    shards = 3
    backend.overrides["pairing_index_shards"] = shards

    async def seed_and_page(api: Api) -> list[HistoryRecord]:
        keys = api.store.keys
        base = await _base_ms(api)
        for shard in range(shards):
            # The same ids in every shard: the cursor carries the shard to break ties.
            await _write_entries(
                api,
                keys.history_global(shard),
                40,
                lambda i, s=shard: {"event": "penalty", "detail": f"{s}:{i}"},
                base,
            )
        admin = AdminService(api.store, api.settings)
        out: list[HistoryRecord] = []
        before = None
        while True:
            page = await admin.history(limit=7, before=before)
            out.extend(page.records)
            if page.next_cursor is None:
                return out
            before = page.next_cursor

    records = backend.run(seed_and_page)
    details = [r.entry.detail for r in records]
    # Ids descend; within one id, shards descend.
    assert details == [f"{s}:{i}" for i in range(39, -1, -1) for s in (2, 1, 0)]
    assert records[0].cursor.endswith("@2")


def test_stats_counts_the_window_and_the_state(backend: Backend) -> None:
    window = "30m"
    backend.run(_activity)
    run_cli("bans", "add", "app", "a9", "--for", "1h")
    run_cli("bans", "allow", "app", "qa")
    backend.run(lambda api: api.code("r3"))

    (stats,) = json_lines(run_cli("stats", "--window", window, "--json"))
    assert list(stats) == STATS_KEYS
    assert stats["pairs_succeeded"] == 2
    assert stats["pairs_failed"] == 3
    assert stats["pairs_failed_by_code"] == {"CODE_ALREADY_USED": 1, "CODE_NOT_FOUND": 2}
    assert stats["codes_issued"] == 4
    assert stats["bans_added"] == 1
    assert stats["active_sessions"] == 2
    assert stats["live_codes"] == 1
    assert stats["active_bans"] == 1
    assert stats["allowlisted"] == 1
    assert stats["global_failure_budget"]["in_use"] == 3
    table = run_cli("stats", "--window", window)
    assert "CODE_NOT_FOUND 2" in table.stdout


def test_stats_window_excludes_older_entries(backend: Backend) -> None:
    async def old_and_new(api: Api) -> None:
        await _write_entries(
            api,
            api.store.keys.history_global(0),
            3,
            lambda i: {"event": "pair.succeeded", "detail": str(i)},
            await _base_ms(api),
        )
        await api.dispatcher.history.record(
            [PairingHistoryEntry(event="pair.succeeded", at_ms=0, app_id="a1")]
        )

    backend.run(old_and_new)
    (recent,) = json_lines(run_cli("stats", "--window", "30s", "--json"))
    (longer,) = json_lines(run_cli("stats", "--window", "5m", "--json"))
    assert recent["pairs_succeeded"] == 1
    assert longer["pairs_succeeded"] == 4
