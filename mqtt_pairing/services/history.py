"""PairingHistoryService: the audit trail (docs/design.md "Redis keys": history streams).

Records go to a global stream (`history:{global:<n>}`) and to the stream of each identity
involved (`history:{runner:<id>}`, `history:{app:<id>}`), so queries by runner or app read
only that identity's stream; each record has one writer (a pair's `pair.succeeded` is
written to the runner's stream by `open_session`, to the others by the pair's finish).
Streams are trimmed by count (`PAIRING_HISTORY_MAX_LEN`, `PAIRING_HISTORY_IDENTITY_MAX_LEN`)
as they are written, and by age (`PAIRING_HISTORY_RETENTION_S`) off the request path
(docs/design.md "History"); an identity's stream expires when idle for the retention. Codes
appear only masked (docs/protocol.md "Codes"). Recording is best effort: a failure is
logged, never raised, since the change it describes has already happened.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence

from mqtt_pairing.config import Settings
from mqtt_pairing.errors import PairingError
from mqtt_pairing.models import PairingHistoryEntry
from mqtt_pairing.store.redis_store import Call, PairingStore

log = logging.getLogger(__name__)

HISTORY_EVENTS = (
    "code.issued",
    "code.cancelled",
    "pair.succeeded",
    "pair.failed",
    "penalty",
    "ban.added",
    "ban.removed",
    "allow.added",
    "allow.removed",
    "session.opened",
    "session.closed",
)
"""Every kind of history record."""


class PairingHistoryService:
    """Appends audit records.

    Args:
        store: the Redis store.
        settings: history retention (count and age).
    """

    def __init__(self, store: PairingStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def calls(
        self,
        entries: Sequence[PairingHistoryEntry],
        *,
        streams: Collection[str] = ("global", "runner", "app"),
        now_ms: int | None = None,
    ) -> list[Call]:
        """The store calls that append `entries`, to batch with other steps.

        Args:
            entries: the records.
            streams: which streams to write ("global", "runner", "app"): a pair's runner
                record is written by `open_session` itself.
            now_ms: a Redis time the caller has (e.g. the session's creation), for the
                identity streams' age trim on a sample of writes.
        """
        s = self.settings
        return self.store.history_calls(
            entries,
            max_len=s.pairing_history_max_len,
            identity_max_len=s.pairing_history_identity_max_len,
            retention_s=s.pairing_history_retention_s,
            shards=s.pairing_index_shards,
            streams=streams,
            trim_now_ms=now_ms,
        )

    async def record(self, entries: Sequence[PairingHistoryEntry]) -> None:
        """Append records; logs and swallows store errors (best effort)."""
        if not entries:
            return
        try:
            await self.store.batch(self.calls(entries))
        except PairingError as exc:
            log.warning("history not recorded: %s", exc.message)
