"""Admin commands: `history`, `bans`, `sessions`, `codes` and `stats`.

They talk to the service's Redis (settings as for `serve`: `REDIS_URL`, the `REDIS_HOST`
group or `REDIS_CLUSTER_URL`, `PAIRING_KEY_PREFIX`, `PAIRING_INDEX_SHARDS`; `PAIRING_SECRET`
is not needed) through `AdminService`. Output is a rich table by default and one JSON object per
line with `--json` (the fields are documented in README.md, Administration, and kept stable).

Exit codes: 0 success, 1 a domain or runtime error (no such session, Redis unreachable),
2 bad usage (a malformed id, duration, time or cursor; no Redis setting). Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import re
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mqtt_pairing.admin import AdminService, BanEntry, CodeInfo, HistoryRecord, parse_cursor
from mqtt_pairing.cli.common import EXIT_USAGE, fail
from mqtt_pairing.config import Settings, load_settings, redact_url
from mqtt_pairing.errors import ConfigError, PairingError, SessionNotFound, StoreUnavailable
from mqtt_pairing.models import PairingSession
from mqtt_pairing.services.history import HISTORY_EVENTS
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from mqtt_pairing.store.keys import MS_PER_S
from mqtt_pairing.topics import is_valid_id

__all__ = [
    "When",
    "bans_app",
    "codes_app",
    "history",
    "parse_duration_s",
    "parse_when",
    "sessions_app",
    "stats",
]

T = TypeVar("T")
Kind = Literal["runner", "app"]

NO_REDIS = (
    "REDIS_URL (or REDIS_HOST, or REDIS_CLUSTER_URL) must be set to the service's Redis; "
    "in embedded mode `mqtt-pairing serve` prints the REDIS_URL of its in-memory store"
)
ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"
MAX_REASON_CHARS = 200
MAX_HISTORY_LIMIT = 10_000
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_DURATION_RE = re.compile(r"^(\d{1,9})([smhdw])$")
_PERMANENT = frozenset({"permanent", "forever"})
_WIDE_OUTPUT = 200
"""Columns of a table written to a pipe or file (rich would use 80)."""

# ---- input parsing (pure) -----------------------------------------------------------


def parse_duration_s(text: str, *, allow_permanent: bool = False) -> int | None:
    """Parse `30m`, `2h`, `1d`, `1w`, `90s` (and `permanent` where allowed) to seconds.

    Returns:
        Whole seconds (> 0), or None for `permanent`.

    Raises:
        ValueError: anything else (a bare number has no unit and is refused).
    """
    value = text.strip().lower()
    if allow_permanent and value in _PERMANENT:
        return None
    m = _DURATION_RE.fullmatch(value)
    if m is None or int(m.group(1)) == 0:
        hint = "|permanent" if allow_permanent else ""
        raise ValueError(f"expected a duration such as 90s|30m|2h|1d|1w{hint}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


@dataclass(frozen=True, slots=True)
class When:
    """A point in time given on the command line: some time ago, or an absolute time."""

    ago_s: int | None = None
    at_ms: int | None = None

    def resolve(self, now_ms: int) -> int:
        """Epoch ms, with relative times counted back from `now_ms` (Redis time)."""
        if self.at_ms is not None:
            return self.at_ms
        return now_ms - (self.ago_s or 0) * MS_PER_S


def parse_when(text: str) -> When:
    """Parse `1h` (ago), `now`, or an ISO 8601 date or time (UTC unless it has an offset).

    Raises:
        ValueError: none of these.
    """
    value = text.strip()
    if value.lower() == "now":
        return When(ago_s=0)
    try:
        return When(ago_s=parse_duration_s(value))
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            "expected a duration ago (30m, 2h, 7d) or an ISO 8601 time (2026-11-29T12:00:00Z)"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return When(at_ms=int(dt.timestamp() * MS_PER_S))


# ---- plumbing -------------------------------------------------------------------------


def _default_actor() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "admin"


def _target() -> tuple[Settings, str]:
    try:
        settings = load_settings()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    url = settings.redis_cluster_url or settings.resolved_redis_url()
    if url is None:
        fail(NO_REDIS, EXIT_USAGE)
    return settings, url


class _BadRedisUrl(Exception):
    pass


def _run(work: Callable[[AdminService], Awaitable[T]], *, actor: str | None = None) -> T:
    """Connect to the service's Redis, run `work`, and turn failures into one line."""
    settings, url = _target()
    # The store logs a warning when Redis is unreachable; the one-line error says it.
    logging.getLogger("mqtt_pairing").addHandler(logging.NullHandler())

    async def main() -> T:
        try:
            client = connect_redis(
                url, timeout_s=settings.redis_timeout_s, cluster=bool(settings.redis_cluster_url)
            )
        except ValueError:
            raise _BadRedisUrl from None
        store = PairingStore(client, KeySchema(settings.pairing_key_prefix))
        try:
            admin = AdminService(store, settings, actor=actor or _default_actor())
            await admin.now_ms()  # reachable, and the credentials are right
            return await work(admin)
        finally:
            await store.aclose()

    try:
        return asyncio.run(main())
    except _BadRedisUrl:
        fail("REDIS_URL: not a Redis URL (redis://[:password@]host:port/db)", EXIT_USAGE)
    except StoreUnavailable:
        fail(f"Redis is unreachable at {redact_url(url)}")
    except PairingError as exc:
        fail(exc.message)


def _check_id(value: str, what: str) -> str:
    if not is_valid_id(value):
        fail(f"{what}: not a valid id ({ID_RULE})", EXIT_USAGE)
    return value


def _check_kind(value: str) -> Kind:
    kind = value.strip().lower()
    if kind == "runner":
        return "runner"
    if kind == "app":
        return "app"
    return fail("KIND: must be app or runner", EXIT_USAGE)


def _check_reason(value: str) -> str:
    if len(value) > MAX_REASON_CHARS:
        fail(f"--reason: at most {MAX_REASON_CHARS} characters", EXIT_USAGE)
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in value):
        fail("--reason: must not contain control characters", EXIT_USAGE)
    return value


def _console() -> Console:
    console = Console(highlight=False, soft_wrap=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, soft_wrap=False, width=_WIDE_OUTPUT)
    return console


def _say(message: str) -> None:
    typer.echo(message)


def _json_lines(objects: Iterable[dict[str, Any]]) -> None:
    for obj in objects:
        typer.echo(json.dumps(obj, ensure_ascii=False, separators=(",", ":")))


def _ts(at_ms: int | None) -> str:
    if at_ms is None:
        return "-"
    return datetime.fromtimestamp(at_ms / MS_PER_S, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _span(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    parts = []
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return " ".join(parts[:2])


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else escape(str(value))


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    _console().print(table)


def _length(duration_s: int | None) -> str:
    return "permanently" if duration_s is None else f"for {_span(duration_s)}"


# ---- options ----------------------------------------------------------------------------

JsonOpt = Annotated[
    bool,
    typer.Option("--json", help="One JSON object per line (fields: README.md, Administration)."),
]
KindArg = Annotated[str, typer.Argument(metavar="{app|runner}", help="app or runner.")]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="The app_id or runner_id.")]
RunnerOpt = Annotated[str | None, typer.Option("--runner", metavar="ID", help="A runner_id.")]
AppOpt = Annotated[str | None, typer.Option("--app", metavar="ID", help="An app_id.")]
ByOpt = Annotated[
    str | None,
    typer.Option("--by", metavar="NAME", help="Who acts, for the record (default: $USER)."),
]

# ---- history ----------------------------------------------------------------------------


def history(
    runner: RunnerOpt = None,
    app_id: AppOpt = None,
    event_types: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            metavar="EVENT",
            help=f"Only this event (repeatable): {', '.join(HISTORY_EVENTS)}.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="WHEN", help="From this time on: 1h (ago) or ISO 8601."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", metavar="WHEN", help="Up to this time: 10m (ago) or ISO 8601."),
    ] = None,
    before: Annotated[
        str | None,
        typer.Option(
            "--before",
            metavar="CURSOR",
            help="Only entries older than this cursor (the `cursor` of the last entry of "
            "the previous page): the next page.",
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", help="At most N entries (1-10000).")
    ] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Show the audit history, newest first (codes masked).

    With --runner or --app only that identity's history is read. With a full page a
    hint for the next one (--before CURSOR) goes to stderr; with --json, pass the last
    line's `cursor`. Examples:

        mqtt-pairing history --runner build-01 --since 7d

        mqtt-pairing history --type pair.failed --since 1h --json

        mqtt-pairing history --app phone-7f3a --since 2026-11-01 --until 2026-11-08

        mqtt-pairing history --limit 100 --before 1764417600000-0
    """
    if runner is not None:
        _check_id(runner, "--runner")
    if app_id is not None:
        _check_id(app_id, "--app")
    types = list(event_types or [])
    for event in types:
        if event not in HISTORY_EVENTS:
            fail(f"--type: one of {', '.join(HISTORY_EVENTS)}", EXIT_USAGE)
    if not 1 <= limit <= MAX_HISTORY_LIMIT:
        fail(f"--limit: between 1 and {MAX_HISTORY_LIMIT}", EXIT_USAGE)
    bounds: list[When | None] = []
    for name, text in (("--since", since), ("--until", until)):
        try:
            bounds.append(parse_when(text) if text is not None else None)
        except ValueError as exc:
            fail(f"{name}: {exc}", EXIT_USAGE)
    if before is not None:
        try:
            parse_cursor(before)
        except ValueError as exc:
            fail(f"--before: {exc}", EXIT_USAGE)
    since_when, until_when = bounds

    async def work(admin: AdminService) -> tuple[list[HistoryRecord], str | None]:
        now = await admin.now_ms()
        page = await admin.history(
            runner_id=runner,
            app_id=app_id,
            events=types,
            since_ms=since_when.resolve(now) if since_when else None,
            until_ms=until_when.resolve(now) if until_when else None,
            before=before,
            limit=limit,
        )
        return page.records, page.next_cursor

    records, next_cursor = _run(work)
    if as_json:
        _json_lines(r.to_json() for r in records)
        return
    if not records:
        _say("no history entries")
        return
    _table(
        "history (newest first, times UTC)",
        ["time", "event", "runner", "app", "session", "code", "error", "detail"],
        (
            (
                _ts(r.entry.at_ms),
                r.entry.event,
                r.entry.runner_id,
                r.entry.app_id,
                r.entry.session_id,
                r.entry.code_mask,
                r.entry.error_code.value if r.entry.error_code else None,
                r.entry.detail,
            )
            for r in records
        ),
    )
    if next_cursor is not None:
        typer.echo(f"more: --before {next_cursor}", err=True)


# ---- bans -------------------------------------------------------------------------------

bans_app = typer.Typer(
    help="Admin bans, automatic penalties and the allowlist.", no_args_is_help=True
)


def _ban_rows(bans: Sequence[BanEntry]) -> Iterable[Sequence[object]]:
    for b in bans:
        until = "permanent" if b.permanent else _ts(b.until_ms) if b.until_ms else None
        yield (b.type, b.kind, b.id, until, _span(b.remaining_s), b.strikes, b.reason, b.by)


@bans_app.command("list")
def bans_list(as_json: JsonOpt = False) -> None:
    """List admin bans, automatic penalties (strikes, end) and allowlisted ids.

    For example:

        mqtt-pairing bans list

        mqtt-pairing bans list --json | jq 'select(.type == "penalty")'
    """
    bans = _run(lambda admin: admin.list_bans())
    if as_json:
        _json_lines(b.to_json() for b in bans)
        return
    if not bans:
        _say("no bans, penalties or allowlisted ids")
        return
    _table(
        "bans, penalties and allowlist (times UTC)",
        ["type", "kind", "id", "until", "left", "strikes", "reason", "by"],
        _ban_rows(bans),
    )


@bans_app.command("add")
def bans_add(
    kind: KindArg,
    ident: IdArg,
    length: Annotated[
        str,
        typer.Option(
            "--for", metavar="DURATION", help="30m, 2h, 1d, 90s ... or permanent (the default)."
        ),
    ] = "permanent",
    reason: Annotated[
        str, typer.Option("--reason", metavar="TEXT", help="Why, for the record.")
    ] = "",
    by: ByOpt = None,
) -> None:
    """Ban an app or runner; it takes effect on its next request.

    A banned app gets BANNED (with retry_after_s unless permanent); banning a runner
    also cancels its active code. Examples:

        mqtt-pairing bans add app phone-7f3a --for 2h --reason "guessing codes"

        mqtt-pairing bans add runner build-01 --for permanent
    """
    k = _check_kind(kind)
    _check_id(ident, "ID")
    _check_reason(reason)
    try:
        duration_s = parse_duration_s(length, allow_permanent=True)
    except ValueError as exc:
        fail(f"--for: {exc}", EXIT_USAGE)

    async def work(admin: AdminService) -> tuple[BanEntry, bool]:
        return await admin.add_ban(k, ident, duration_s=duration_s, reason=reason)

    ban, replaced = _run(work, actor=by)
    until = "" if ban.until_ms is None else f" (until {_ts(ban.until_ms)} UTC)"
    note = "; it replaces the earlier ban" if replaced else ""
    _say(f"banned {k} {ident} {_length(duration_s)}{until}{note}")


@bans_app.command("remove")
def bans_remove(kind: KindArg, ident: IdArg, by: ByOpt = None) -> None:
    """Lift the admin ban and any automatic penalty of an app or runner.

    Lifting a penalty also forgets its strikes. Exit 1 if there was neither. Example:

        mqtt-pairing bans remove app phone-7f3a
    """
    k = _check_kind(kind)
    _check_id(ident, "ID")

    async def work(admin: AdminService) -> tuple[bool, bool]:
        return await admin.remove_ban(k, ident)

    had_ban, had_penalty = _run(work, actor=by)
    if not (had_ban or had_penalty):
        fail(f"{k} {ident} is neither banned nor penalised")
    lifted = " and ".join(n for n, d in (("ban", had_ban), ("penalty", had_penalty)) if d)
    _say(f"lifted the {lifted} of {k} {ident}")


@bans_app.command("allow")
def bans_allow(kind: KindArg, ident: IdArg) -> None:
    """Allowlist an app or runner: no automatic penalties (for false positives).

    Admin bans and the global failure budget still apply. An active penalty stays until
    lifted with `bans remove`. Example:

        mqtt-pairing bans allow app qa-device-01
    """
    k = _check_kind(kind)
    _check_id(ident, "ID")

    async def work(admin: AdminService) -> bool:
        return await admin.set_allowed(k, ident, True)

    changed = _run(work)
    _say(f"{k} {ident} {'is now' if changed else 'was already'} on the allowlist")


@bans_app.command("disallow")
def bans_disallow(kind: KindArg, ident: IdArg) -> None:
    """Take an app or runner off the allowlist (exit 1 if it was not on it).

    For example:

        mqtt-pairing bans disallow app qa-device-01
    """
    k = _check_kind(kind)
    _check_id(ident, "ID")

    async def work(admin: AdminService) -> bool:
        return await admin.set_allowed(k, ident, False)

    if not _run(work):
        fail(f"{k} {ident} is not on the allowlist")
    _say(f"{k} {ident} is no longer on the allowlist")


# ---- sessions ---------------------------------------------------------------------------

sessions_app = typer.Typer(help="List and revoke pairing sessions.", no_args_is_help=True)


@sessions_app.command("list")
def sessions_list(
    runner: RunnerOpt = None, app_id: AppOpt = None, as_json: JsonOpt = False
) -> None:
    """List active sessions: of a runner, of an app, of both, or all.

    Listing does not refresh a session's last_seen_at. Examples:

        mqtt-pairing sessions list --runner build-01

        mqtt-pairing sessions list --app phone-7f3a --json

        mqtt-pairing sessions list
    """
    if runner is not None:
        _check_id(runner, "--runner")
    if app_id is not None:
        _check_id(app_id, "--app")

    async def work(admin: AdminService) -> list[PairingSession]:
        return await admin.list_sessions(runner_id=runner, app_id=app_id)

    found = _run(work)
    if as_json:
        _json_lines(s.to_wire() for s in found)
        return
    if not found:
        _say("no active sessions")
        return
    _table(
        "active sessions (times UTC)",
        ["session", "runner", "app", "runner name", "app name", "created", "last seen"],
        (
            (
                s.session_id,
                s.runner_id,
                s.app_id,
                s.runner_name,
                s.app_name,
                _ts(s.created_at_ms),
                _ts(s.last_seen_at_ms),
            )
            for s in found
        ),
    )


@sessions_app.command("revoke")
def sessions_revoke(
    session_id: Annotated[
        str | None, typer.Argument(metavar="SESSION_ID", help="The session to revoke.")
    ] = None,
    runner: Annotated[
        str | None,
        typer.Option("--runner", metavar="ID", help="Revoke all sessions of this runner."),
    ] = None,
) -> None:
    """Revoke one session, or all of a runner's; both parties get session.closed.

    The closed_reason is "revoked". A running service publishes the events within
    PAIRING_SWEEP_INTERVAL_S; if none runs, they wait in the runner's outbox until one
    starts. Exit 1 if SESSION_ID is not an active session. Examples:

        mqtt-pairing sessions revoke 3f2b6c1e-8d4a-4c53-9a0e-2b7f1d9c4e55

        mqtt-pairing sessions revoke --runner build-01
    """
    if (session_id is None) == (runner is None):
        fail("give either SESSION_ID or --runner ID", EXIT_USAGE)
    if session_id is not None:
        sid = _check_id(session_id, "SESSION_ID")

        async def one(admin: AdminService) -> PairingSession | None:
            try:
                return await admin.revoke_session(sid)
            except SessionNotFound:
                return None

        closed = _run(one)
        if closed is None:
            fail(f"no active session {sid}")
        _say(f"revoked session {sid} (runner {closed.runner_id}, app {closed.app_id})")
        return
    assert runner is not None  # noqa: S101 - exactly one was given
    rid = _check_id(runner, "--runner")

    async def all_of(admin: AdminService) -> list[PairingSession]:
        return await admin.revoke_runner_sessions(rid)

    sessions = _run(all_of)
    plural = "" if len(sessions) == 1 else "s"
    _say(f"revoked {len(sessions)} session{plural} of runner {rid}")


# ---- codes ------------------------------------------------------------------------------

codes_app = typer.Typer(help="List and revoke live pairing codes (masked).", no_args_is_help=True)


@codes_app.command("list")
def codes_list(runner: RunnerOpt = None, as_json: JsonOpt = False) -> None:
    """List live codes (masked) with their expiry and uses left; of one runner or all.

    For example:

        mqtt-pairing codes list

        mqtt-pairing codes list --runner build-01 --json
    """
    if runner is not None:
        _check_id(runner, "--runner")

    async def work(admin: AdminService) -> list[CodeInfo]:
        return await admin.list_codes(runner_id=runner)

    codes = _run(work)
    if as_json:
        _json_lines(c.to_json() for c in codes)
        return
    if not codes:
        _say("no live codes")
        return
    _table(
        "live codes (masked, times UTC)",
        ["runner", "code", "uses left", "created", "expires", "in"],
        (
            (
                c.runner_id,
                c.masked,
                f"{c.uses_left}/{c.max_uses}",
                _ts(c.created_at_ms),
                _ts(c.expires_at_ms),
                _span(c.expires_in_s),
            )
            for c in codes
        ),
    )


@codes_app.command("revoke")
def codes_revoke(
    runner: Annotated[
        str | None,
        typer.Option("--runner", metavar="ID", help="The runner whose code to cancel."),
    ] = None,
    by: ByOpt = None,
) -> None:
    """Cancel a runner's active code (exit 1 if it has no live code).

    The code then answers CODE_ALREADY_USED. Example:

        mqtt-pairing codes revoke --runner build-01
    """
    if runner is None:
        fail("--runner ID is required", EXIT_USAGE)
    rid = _check_id(runner, "--runner")

    async def work(admin: AdminService) -> bool:
        return await admin.revoke_code(rid)

    if not _run(work, actor=by):
        fail(f"runner {rid} has no live code")
    _say(f"cancelled the code of runner {rid}")


# ---- stats ------------------------------------------------------------------------------


def stats(
    window: Annotated[
        str,
        typer.Option("--window", metavar="DURATION", help="How far back: 15m, 1h, 1d, 7d ..."),
    ] = "1h",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object (README.md, Administration).")
    ] = False,
) -> None:
    """Pairs succeeded and failed (by error code), bans, sessions, codes, failure budget.

    Counts over the window come from the history; the rest is the current state. For
    example:

        mqtt-pairing stats

        mqtt-pairing stats --window 1d --json
    """
    try:
        window_s = parse_duration_s(window)
    except ValueError as exc:
        fail(f"--window: {exc}", EXIT_USAGE)
    assert window_s is not None  # noqa: S101 - no `permanent` here
    result = _run(lambda admin: admin.stats(window_s))
    data = result.to_json()
    if as_json:
        _json_lines([data])
        return
    failed = ", ".join(f"{code} {n}" for code, n in data["pairs_failed_by_code"].items())
    budget = data["global_failure_budget"]
    rows: list[tuple[str, object]] = [
        ("window", f"{_span(window_s)} ({_ts(result.from_ms)} to {_ts(result.to_ms)} UTC)"),
        ("pairs succeeded", data["pairs_succeeded"]),
        ("pairs failed", f"{data['pairs_failed']}" + (f" ({failed})" if failed else "")),
        ("codes issued", data["codes_issued"]),
        ("bans added", data["bans_added"]),
        ("automatic penalties", data["penalties"]),
        ("sessions closed", data["sessions_closed"]),
        ("active sessions", data["active_sessions"]),
        ("live codes", data["live_codes"]),
        ("bans in force", data["active_bans"]),
        ("penalties in force", data["active_penalties"]),
        ("allowlisted", data["allowlisted"]),
        (
            "global failure budget",
            f"{budget['in_use']} of {budget['limit']} per {_span(budget['window_s'])}",
        ),
    ]
    _table("pairing stats", ["", "value"], rows)
