"""Every Redis key template of the service (docs/design.md, "Redis keys").

Hash tags are `{runner:<id>}`, `{app:<id>}`, `{c:<code group>}`, `{session:<id>}` and
`{global:<n>}` only (docs/design.md names `{code:<digest>}`; codes are tagged by the first two
hex characters of their digest instead, see `code_group`), and every Lua script touches
keys of one tag, so each script runs on one Redis Cluster slot. The tag always comes
first after the prefix and kind, so a `request_id` (which may hold braces) placed after it
cannot move the slot. No key holds a live code: `<digest>` is the HMAC digest of the code
(see `codes.code_digest`).
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

from mqtt_pairing.codes import CODE_GROUP_HEX, DIGEST_HEX_CHARS, code_group

MS_PER_S = 1000


_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


SESSION_KEYS_MARGIN_S = 86_400
"""Every key of a session lives this much longer than the session's idle deadline.

The expiry sweep acts at the deadline (last_seen_at + idle TTL) and reads the runner's
sessions hash and runner hash, then the app's index and the by-id lookup; a key whose TTL
were the idle TTL itself would vanish at that very moment, and the session with it,
without a `session.closed`. The margin lets a sweep that runs late (every instance down,
a failover) still close the session; closed sessions are deleted outright, so the margin
holds memory only for keys nothing closes."""


def session_keys_ttl_ms(idle_ttl_s: int) -> int:
    """TTL of the keys of a session refreshed now (idle TTL plus the margin), ms."""
    return (idle_ttl_s + SESSION_KEYS_MARGIN_S) * MS_PER_S


def glob_escape(text: str) -> str:
    """`text` with the characters special to SCAN's MATCH escaped."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


def hash_tag(key: str) -> str:
    """The part of `key` that Redis Cluster hashes: the first non-empty `{...}`, or the key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


@dataclass(frozen=True, slots=True)
class KeySchema:
    """Key templates under one prefix (setting `PAIRING_KEY_PREFIX`, no braces)."""

    prefix: str = "pairing"

    def code(self, digest: str) -> str:
        """Hash of a code; one-letter field names, listed in store/lua/issue_code.lua.

        Tagged by the code's group (`code_group`), not the whole digest, so that the
        claim reads its group's tombstone strings in the same slot.
        """
        return f"{self.prefix}:code:{{c:{code_group(digest)}}}:{digest}"

    def code_claims(self, digest: str) -> str:
        """Hash: app_id, a newline and request_id -> session_id, for every use of the code."""
        return f"{self.code(digest)}:claims"

    def code_pattern(self) -> str:
        """A SCAN pattern of every code hash (not their claims)."""
        return f"{glob_escape(self.prefix)}:code:{{c:??}}:{'?' * DIGEST_HEX_CHARS}"

    def digest_of(self, code_key: str) -> str | None:
        """The digest in a code hash's key, or None if it is not one."""
        head = f"{self.prefix}:code:{{c:"
        if not code_key.startswith(head):
            return None
        digest = code_key[len(head) + CODE_GROUP_HEX + 2 :]
        return digest if len(digest) == DIGEST_HEX_CHARS else None

    def tombstones(self, group: str, window: int, bucket: int) -> str:
        """String of 6-byte records: the codes of one group and bucket expiring in a window.

        See `mqtt_pairing.tombstones`: the `CODE_EXPIRED` answer once a code hash is gone.
        Same tag as the group's code hashes.
        """
        return f"{self.prefix}:tomb:{{c:{group}}}:{window}:{bucket}"

    def runner(self, runner_id: str) -> str:
        """Hash: active code digest, name, public key, metadata, presence."""
        return f"{self.prefix}:runner:{{runner:{runner_id}}}"

    def runner_sessions(self, runner_id: str) -> str:
        """Hash: session_id -> session JSON (active sessions only)."""
        return f"{self.prefix}:runner:{{runner:{runner_id}}}:sessions"

    def app_sessions(self, app_id: str) -> str:
        """Hash: session_id -> runner_id (index of the app's sessions)."""
        return f"{self.prefix}:app:{{app:{app_id}}}:sessions"

    def session(self, session_id: str) -> str:
        """String: JSON `{"runner_id", "app_id"}`, to find a session by id (revoke)."""
        return f"{self.prefix}:session:{{session:{session_id}}}"

    def limit(self, kind: str, ident: str) -> str:
        """Hash: admin ban, allowlist, penalty, and the logs of requests and failed guesses.

        One HMGET of it answers a request's ban, penalty and rate checks; fields and TTL
        are described in store/lua/_prelude.lua (`limit_keep`).
        """
        return f"{self.prefix}:limit:{{{kind}:{ident}}}"

    def limit_failures(self, kind: str, ident: str) -> str:
        """Not a key of its own any more (the failure log is the limit hash's `fl`).

        A key of the identity's tag that `finish_request` is given and leaves alone, for
        the callers that still pass it (`app_index_call`).
        """
        return f"{self.prefix}:limit:{{{kind}:{ident}}}:fail"

    def budget(self, shard: int) -> str:
        """Sorted set: reserved units of the global failure budget (score: ms)."""
        return f"{self.prefix}:budget:{{global:{shard}}}"

    def dedupe(self, kind: str, ident: str, op: str, request_id: str) -> str:
        """Hash: payload hash, state (pending/done), lease, remembered reply."""
        return f"{self.prefix}:dedupe:{{{kind}:{ident}}}:{op}:{request_id}"

    def outbox(self, runner_id: str) -> str:
        """Stream: events written by the runner-slot scripts, until published."""
        return f"{self.prefix}:outbox:{{runner:{runner_id}}}"

    def outbox_due(self, shard: int) -> str:
        """Sorted set: runner_id -> when its outbox should be drained (ms; a lease)."""
        return f"{self.prefix}:outbox-due:{{global:{shard}}}"

    def expiry(self, shard: int) -> str:
        """Sorted set: runner_id, newline, session_id -> idle deadline (ms), for the sweep."""
        return f"{self.prefix}:expiry:{{global:{shard}}}"

    def history_global(self, shard: int) -> str:
        """Stream: the audit history of all identities (trimmed by count and age)."""
        return f"{self.prefix}:history:{{global:{shard}}}"

    def history(self, kind: str, ident: str) -> str:
        """Stream: the audit history of one runner or app (expires when idle)."""
        return f"{self.prefix}:history:{{{kind}:{ident}}}"

    def presence_leader(self) -> str:
        """String: the instance that records runners' status messages (a lease)."""
        return f"{self.prefix}:presence-leader:{{global:0}}"

    def shard_of(self, member: str, shards: int) -> int:
        """The shard of a member of a sharded global key: stable, CRC32 based."""
        return zlib.crc32(member.encode()) % shards

    def budget_shard(self, member: str, shards: int) -> int:
        """The budget shard of a reservation: stable for the same member."""
        return zlib.crc32(member.encode()) % shards
