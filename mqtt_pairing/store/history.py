"""History: the audit records of pairs, failures, penalties and closes (docs/operations.md)."""

from __future__ import annotations

from collections.abc import Sequence

from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.store.keys import MS_PER_S
from mqtt_pairing.store.transport import (
    Call,
    ScriptCall,
    Transport,
)

HISTORY_SCRIPTS = ("append_history",)
"""The Lua scripts (store/lua/) of this aggregate."""


class HistoryStore(Transport):
    """The global history streams ({global:<n>}) and each identity's own."""

    # ---- history ----------------------------------------------------------------------

    def history_calls(
        self,
        entries: Sequence[PairingHistoryEntry],
        *,
        max_len: int,
        identity_max_len: int,
        retention_s: int,
        shards: int,
    ) -> list[Call]:
        """The `append_history` calls for entries: global history and each identity's.

        One call per stream, with that stream's records in order (a pair's two records go
        to each of its three streams in three calls, not six).
        """
        retention_ms = retention_s * MS_PER_S
        streams: dict[str, tuple[int, list[str | int]]] = {}
        for entry in entries:
            fields: list[str | int] = []
            for name, value in entry.model_dump(exclude={"at_ms"}, exclude_none=True).items():
                fields += [name, str(value)]
            anchor = entry.app_id or entry.runner_id or entry.event
            shard = self.keys.shard_of(anchor, shards)
            targets = [(self.keys.history_global(shard), max_len)]
            if entry.runner_id:
                targets.append((self.keys.history("runner", entry.runner_id), identity_max_len))
            if entry.app_id:
                targets.append((self.keys.history("app", entry.app_id), identity_max_len))
            # session.opened / session.closed may come from two writers (the request and
            # the delivery that deleted the outbox entry; see append_history.lua); other
            # records have one, and skip the look-back.
            once = int(entry.event in ("session.opened", "session.closed"))
            for key, length in targets:
                streams.setdefault(key, (length, []))[1].extend((once, len(fields), *fields))
        return [
            ScriptCall("append_history", (key,), (length, retention_ms, 1, *records))
            for key, (length, records) in streams.items()
        ]

    async def append_history(
        self,
        entries: Sequence[PairingHistoryEntry],
        *,
        max_len: int,
        identity_max_len: int,
        retention_s: int,
        shards: int,
    ) -> None:
        """Append records to the global history and to each identity's history.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.batch(
            self.history_calls(
                entries,
                max_len=max_len,
                identity_max_len=identity_max_len,
                retention_s=retention_s,
                shards=shards,
            )
        )
