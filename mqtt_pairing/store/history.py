"""History: the audit records of pairs, failures, penalties and closes (docs/operations.md)."""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.store.keys import MS_PER_S
from mqtt_pairing.store.transport import (
    Call,
    RawCall,
    ScriptCall,
    Transport,
)

HISTORY_SCRIPTS = ("append_history", "trim_history")
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
        streams: Collection[str] = ("global", "runner", "app"),
        trim_now_ms: int | None = None,
    ) -> list[Call]:
        """The commands that append entries to the global history and each identity's.

        One call per stream: a plain `XADD ... MAXLEN ~` for a single record to a global
        shard; else `append_history` (the records in order, and for an identity stream its
        TTL in the same script: it expires when idle for the retention, and a cluster runs
        the calls of a batch concurrently). Each record has one writer, so nothing is
        looked up first, and no time is read: the age trim is off this path (the global
        shards by the outbox sweep, `trim_history_call`; an identity stream on about one
        write in 16 when the caller passes a Redis time, `trim_now_ms`), and readers never
        show records older than the retention.

        Args:
            entries: the records.
            max_len: records kept per global shard (approximate).
            identity_max_len: records kept per identity stream (approximate).
            retention_s: the history retention.
            shards: global history shards.
            streams: which of "global", "runner", "app" to write (a pair's runner record
                is written by `open_session`).
            trim_now_ms: a Redis time, to trim the identity streams by age (sampled).
        """
        retention_ms = retention_s * MS_PER_S
        trim = ""
        if trim_now_ms is not None and random.random() < 1 / 16:
            trim = str(trim_now_ms - retention_ms)
        streams_of: dict[str, tuple[bool, list[str | int]]] = {}
        for entry in entries:
            fields: list[str | int] = []
            for name, value in entry.model_dump(exclude={"at_ms"}, exclude_none=True).items():
                fields += [name, str(value)]
            keys: list[tuple[str, bool]] = []
            if "global" in streams:
                anchor = entry.app_id or entry.runner_id or entry.event
                keys.append((self.keys.history_global(self.keys.shard_of(anchor, shards)), False))
            for kind, ident in (("runner", entry.runner_id), ("app", entry.app_id)):
                if ident and kind in streams:
                    keys.append((self.keys.history(kind, ident), True))
            for key, identity in keys:
                streams_of.setdefault(key, (identity, []))[1].extend((len(fields), *fields))
        calls: list[Call] = []
        for key, (identity, records) in streams_of.items():
            if not identity and records[0] == len(records) - 1:
                # one record, no TTL: a plain XADD
                calls.append(RawCall(("XADD", key, "MAXLEN", "~", max_len, "*", *records[1:])))
                continue
            args: tuple[str | int, ...] = (
                (identity_max_len, retention_ms, trim) if identity else (max_len, "", "")
            )
            calls.append(ScriptCall("append_history", (key,), (*args, *records)))
        return calls

    def trim_history_call(self, shard: int, *, retention_s: int) -> ScriptCall:
        """The `trim_history` call: drop a global shard's records older than the retention."""
        return ScriptCall(
            "trim_history", (self.keys.history_global(shard),), (retention_s * MS_PER_S,)
        )

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
