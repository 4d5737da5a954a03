"""PairingStore: every check-and-change of the service as one Lua script on one hash tag.

The store is one class over one `Transport` (store/transport.py: connections, round trips,
NOSCRIPT, errors), made of one module per aggregate, each with its scripts in `lua/`:

- `limits`: idempotency, bans, allowlist, penalties, request rate, the failure budget;
- `codes`: codes, tombstones, the runner's active code, claims of a code's uses;
- `sessions`: sessions, their indexes and idle deadlines, the expiry sweep;
- `outbox`: runners' outboxes, due marks, heartbeats and statuses (presence);
- `history`: the audit streams.

This module also keeps the names other modules import from the store.
"""

from __future__ import annotations

from typing import Any, cast

from mqtt_pairing.store.codes import (
    CLAIM_IN_FLIGHT_S,
    CODES_SCRIPTS,
    Claim,
    ClaimBusy,
    CodeStore,
)
from mqtt_pairing.store.history import HISTORY_SCRIPTS, HistoryStore
from mqtt_pairing.store.keys import (
    MS_PER_S,
    SESSION_KEYS_MARGIN_S,
    glob_escape,
    session_keys_ttl_ms,
)
from mqtt_pairing.store.limits import (
    LIMITS_SCRIPTS,
    Begin,
    LimitStore,
    Mismatch,
    Pending,
    Replay,
)
from mqtt_pairing.store.outbox import (
    OUTBOX_SCRIPTS,
    PRESENCE_ANNOUNCE_MAX,
    PRESENCE_ANNOUNCE_WINDOW_S,
    OutboxEntry,
    OutboxStore,
    parse_outbox,
)
from mqtt_pairing.store.sessions import SESSIONS_SCRIPTS, OpenedSession, SessionStore
from mqtt_pairing.store.transport import (
    DEFAULT_MAX_INFLIGHT,
    RESERVED_CONNECTIONS,
    UNAVAILABLE_RETRY_S,
    Call,
    Kind,
    RawCall,
    ScriptCall,
    call_deadline_s,
    connect_redis,
    load_prelude_source,
    load_script_source,
    pool_size,
)

__all__ = [
    "CLAIM_IN_FLIGHT_S",
    "DEFAULT_MAX_INFLIGHT",
    "PRESENCE_ANNOUNCE_MAX",
    "PRESENCE_ANNOUNCE_WINDOW_S",
    "RESERVED_CONNECTIONS",
    "SCRIPT_NAMES",
    "SESSION_KEYS_MARGIN_S",
    "UNAVAILABLE_RETRY_S",
    "Begin",
    "Call",
    "Claim",
    "ClaimBusy",
    "Kind",
    "Mismatch",
    "OpenedSession",
    "OutboxEntry",
    "PairingStore",
    "Pending",
    "RawCall",
    "Replay",
    "ScriptCall",
    "call_deadline_s",
    "connect_redis",
    "load_prelude_source",
    "load_script_source",
    "parse_outbox",
    "pool_size",
    "session_keys_ttl_ms",
]

SCRIPT_NAMES = LIMITS_SCRIPTS + CODES_SCRIPTS + SESSIONS_SCRIPTS + OUTBOX_SCRIPTS + HISTORY_SCRIPTS
"""Every Lua script of the store (store/lua/<name>.lua)."""


class PairingStore(LimitStore, CodeStore, SessionStore, OutboxStore, HistoryStore):
    """Domain verbs over Redis; every multi-step change is one Lua script.

    Args:
        client: a redis-py asyncio client with `decode_responses=True`.
        keys: key templates (prefix from `PAIRING_KEY_PREFIX`).
    """

    script_names = SCRIPT_NAMES

    # ---- across aggregates -----------------------------------------------------------

    async def set_ban(
        self, kind: Kind, ident: str, *, reason: str, by: str, duration_s: int | None
    ) -> None:
        """Ban an app or runner for `duration_s` seconds (None: permanent).

        Banning a runner cancels its active code (docs/protocol.md "Runner code").

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        limit = self.keys.limit(kind, ident)
        other = self.keys.runner(ident) if kind == "runner" else limit
        old = await self._run(
            "set_ban",
            [limit, other],
            [
                "ban",
                reason,
                by,
                -1 if duration_s is None else duration_s * MS_PER_S,
                int(kind == "runner"),
            ],
        )
        if old:
            await self.end_code(old, ident, "cancelled")

    async def migrate_legacy_limits(self) -> int:
        """Move the bans and allowlist entries of earlier versions into the limit hash.

        Versions before the limit hash kept a ban in `ban:{<kind>:<id>}` (hash: reason,
        by, at_ms, until_ms) and the allowlist in `allow:{<kind>:<id>}`; they are no longer
        read, so the service moves them at start (docs/operations.md
        "Upgrading: bans and the allowlist moved"): each becomes the same ban (its time
        and its end kept) or allowlist entry, then the old key is deleted. A ban that ran
        out is only deleted. Idempotent; run by `serve`.

        Returns:
            How many old keys were moved or deleted.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        moved = 0
        prefix = glob_escape(self.keys.prefix)
        for family in ("ban", "allow"):
            pattern = f"{prefix}:{family}:{{*}}"
            found: list[str] = await self._guard(_scan_all(self.client, pattern))
            for key in found:
                tag = key[len(f"{self.keys.prefix}:{family}:{{") : -1]
                kind, _, ident = tag.partition(":")
                if kind not in ("app", "runner") or not ident:
                    continue
                kind_ = cast(Kind, kind)
                if family == "allow":
                    await self.set_allowed(kind_, ident, True)
                else:
                    old: dict[str, str] = await self._guard(self.client.hgetall(key))  # type: ignore[arg-type]
                    until = int(old.get("until_ms") or -1)
                    secs, micros = await self._guard(self.client.time())
                    now = int(secs) * MS_PER_S + int(micros) // MS_PER_S
                    if until < 0 or until > now:
                        # The same ban to the ms, and when it was made: not a new one.
                        limit = self.keys.limit(kind_, ident)
                        length_ms = -1 if until < 0 else until - now
                        args: list[str | int] = ["ban", old.get("reason", ""), old.get("by", "")]
                        args += [length_ms, 0]
                        await self._run("set_ban", [limit, limit], args)
                        exact: list[str | int] = ["ban_until_ms", until]
                        if old.get("at_ms"):
                            exact += ["ban_at_ms", old["at_ms"]]
                        await self.call(RawCall(("HSET", limit, *exact)))
                await self._guard(self.client.delete(key))
                moved += 1
        return moved


async def _scan_all(client: Any, pattern: str) -> list[str]:  # noqa: ANN401 - Redis or RedisCluster
    """Every key matching `pattern` (SCAN, on every master of a cluster)."""
    return [str(key) async for key in client.scan_iter(match=pattern, count=1000)]
