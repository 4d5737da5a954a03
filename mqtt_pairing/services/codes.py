"""PairingCodeService: issue and cancel a runner's pairing code (docs/protocol.md "Runner code")."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from mqtt_pairing.codes import (
    code_digest,
    format_code,
    generate_code,
    mask_code,
    pairing_uri,
)
from mqtt_pairing.config import Settings
from mqtt_pairing.errors import InternalError
from mqtt_pairing.models import CodeRequest, IssuedCode, ok_reply
from mqtt_pairing.sealing import Sealer, derive_key
from mqtt_pairing.store.redis_store import PairingStore

log = logging.getLogger(__name__)

_MAX_DRAWS = 8
"""Draws before giving up on a free digest; a collision in 45 bits is already rare."""


class PairingCodeService:
    """Issues codes, stored only as HMAC digests, and cancels them.

    Args:
        store: the Redis store.
        settings: TTL and use bounds (docs/protocol.md defaults), tombstone time.
        secret: `PAIRING_SECRET` as bytes (digests and sealing).
        draw: the code generator (tests inject a deterministic one).
    """

    def __init__(
        self,
        store: PairingStore,
        settings: Settings,
        secret: bytes,
        draw: Callable[[], str] = generate_code,
    ) -> None:
        self.store = store
        self.settings = settings
        self.digest_key = derive_key(secret, "code-digest/v1")
        self.sealer = Sealer(secret)
        self.draw = draw

    def digest(self, code: str) -> str:
        """HMAC digest of a normalised code: the only form in which a code is stored."""
        return code_digest(self.digest_key, code)

    def clamp_ttl_s(self, requested: int | None) -> int:
        """`ttl_s` clamped to [PAIRING_CODE_TTL_MIN_S, PAIRING_CODE_TTL_MAX_S], seconds."""
        s = self.settings
        value = s.pairing_code_ttl_s if requested is None else requested
        return min(max(value, s.pairing_code_ttl_min_s), s.pairing_code_ttl_max_s)

    def clamp_max_uses(self, requested: int | None) -> int:
        """`max_uses` clamped to [1, PAIRING_CODE_MAX_USES_MAX]."""
        s = self.settings
        value = s.pairing_code_max_uses if requested is None else requested
        return min(max(value, 1), s.pairing_code_max_uses_max)

    def seal_context(self, runner_id: str, request_id: str) -> str:
        """What a sealed `code` reply is bound to: it opens only for the same request."""
        return f"code\n{runner_id}\n{request_id}"

    async def issue(self, runner_id: str, req: CodeRequest) -> tuple[IssuedCode, str]:
        """Draw a new code, store its digest and make it the runner's active code.

        Two Redis round trips (three when a code is replaced): the code hash, then the
        runner's record with the code's tombstone record (`mqtt_pairing.tombstones`).

        The previous code of the runner is replaced at once (it answers
        CODE_ALREADY_USED from then on). The reply is remembered sealed.

        Returns:
            The issued code and its masked form (for logs and history).

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: no free code after several draws.
        """
        s = self.settings
        ttl_s = self.clamp_ttl_s(req.ttl_s)
        max_uses = self.clamp_max_uses(req.max_uses)
        for _ in range(_MAX_DRAWS):
            code = self.draw()
            digest = self.digest(code)
            created = await self.store.issue_code(
                digest,
                runner_id,
                max_uses=max_uses,
                ttl_s=ttl_s,
                first_char=code[0],
            )
            if created is not None:
                break
        else:
            raise InternalError
        _created_ms, expires_ms = created
        issued = IssuedCode(
            code=format_code(code),
            expires_at_ms=expires_ms,
            ttl_s=ttl_s,
            max_uses=max_uses,
            pairing_uri=pairing_uri(code, runner_id),
        )
        reply = json.dumps(ok_reply(req.request_id, issued.to_wire()))
        sealed = self.sealer.seal(reply, context=self.seal_context(runner_id, req.request_id))
        set_code = self.store.set_runner_code_call(
            runner_id,
            digest,
            expires_ms=expires_ms,
            code_ttl_s=ttl_s,
            idle_ttl_s=s.pairing_session_idle_ttl_s,
            request_id=req.request_id,
            sealed_reply=sealed,
            dedupe_ttl_s=s.pairing_dedupe_ttl_s,
            name=req.runner_name,
            public_key=req.public_key,
            metadata=req.metadata,
            max_uses=max_uses,
        )
        # The tombstone record goes with it: after its expiry the code answers
        # CODE_EXPIRED. A crash before this round trip leaves no record (the code then
        # answers CODE_NOT_FOUND after expiry), and no reply either.
        layout = s.tombstones
        calls = [set_code]
        if layout.enabled:
            calls.append(self.store.tombstone_call(layout, digest, expires_ms))
        res = await self.store.batch(calls)
        old = self.store.parse_set_runner_code(res[0])
        if old is not None:
            await self.store.end_code(old, runner_id, "replaced")
        masked = mask_code(code[0], digest)
        log.info(
            "code issued runner=%s code=%s ttl_s=%d max_uses=%d", runner_id, masked, ttl_s, max_uses
        )
        return issued, masked

    def open_remembered(self, runner_id: str, request_id: str, sealed: str) -> str:
        """Open a remembered, sealed `code` reply.

        Raises:
            InternalError: it does not open (another secret, or tampered with).
        """
        try:
            return self.sealer.open(sealed, context=self.seal_context(runner_id, request_id))
        except ValueError:
            raise InternalError from None

    async def cancel(self, runner_id: str) -> bool:
        """Cancel the runner's active code; True if a live code was cancelled.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return await self.store.cancel_code(runner_id)
