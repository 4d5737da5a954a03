"""Requests through a Dispatcher, as the gateway makes them, without MQTT.

`Api(dispatcher)` is what the store, CLI and race tests drive the service side with:
`request`, `code`, `pair`, `pair_ok`, `paired`, `handle`, and a few reads of what the
store holds (`code_hash`, `expires_ms`, `sessions_of`, `runner_session_count`, `now_ms`).
With `record_history=True` it appends the history records the gateway would (the admin
CLI's tests read them back).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from mqtt_pairing.config import Settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.services.outcome import Handled
from mqtt_pairing.store import PairingStore
from mqtt_pairing.topics import Identity, Kind

CODE_FIELDS = {
    "r": "runner_id",
    "s": "state",
    "m": "max_uses",
    "u": "uses_left",
    "c": "created_ms",
    "e": "expires_ms",
    "f": "first",
}
"""The one-letter field names of a code record (store/lua/issue_code.lua)."""


def new_id() -> str:
    return uuid.uuid4().hex


class Api:
    """Requests through a Dispatcher (no MQTT).

    Args:
        dispatcher: the service side.
        record_history: append the history records of each request, as the gateway does.
    """

    record_history = False

    def __init__(self, dispatcher: Dispatcher, *, record_history: bool | None = None) -> None:
        self.d = self.dispatcher = dispatcher
        self.store: PairingStore = dispatcher.store
        self.settings: Settings = dispatcher.settings
        if record_history is not None:
            self.record_history = record_history

    async def handle(
        self, kind: Kind | str, ident: str, op: str, payload: dict[str, Any]
    ) -> Handled:
        handled = await self.d.handle(Identity(Kind(kind), ident), op, json.dumps(payload).encode())
        if self.record_history:
            await self.d.history.record(handled.history)
        return handled

    async def request(
        self,
        kind: Kind | str,
        ident: str,
        op: str,
        *,
        request_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """One request (a fresh request_id unless given); its reply."""
        payload = {"request_id": request_id or new_id(), **fields}
        handled = await self.handle(kind, ident, op, payload)
        assert handled.reply is not None
        return handled.reply

    async def code(self, runner_id: str, *, request_id: str | None = None, **fields: Any) -> str:
        """Issue a code for `runner_id` and return it (as shown, XXX-XXX-XXX)."""
        reply = await self.request(Kind.RUNNER, runner_id, "code", request_id=request_id, **fields)
        assert reply["ok"], reply
        code: str = reply["result"]["code"]
        return code

    async def pair(
        self, app_id: str, code: str, *, request_id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        return await self.request(
            Kind.APP, app_id, "pair", request_id=request_id, code=code, **fields
        )

    async def pair_ok(self, app_id: str, code: str, **fields: Any) -> str:
        """Pair and return the new session_id (the pair must succeed)."""
        reply = await self.pair(app_id, code, **fields)
        assert reply["ok"], reply
        session_id: str = reply["result"]["session"]["session_id"]
        return session_id

    async def paired(self, runner_id: str, app_id: str) -> str:
        """A new session between the two (a fresh code each time)."""
        return await self.pair_ok(app_id, await self.code(runner_id))

    # ---- what the store holds ------------------------------------------------------------
    def digest(self, code: str) -> str:
        return self.d.codes.digest(code)

    async def code_hash(self, code: str) -> dict[str, str]:
        """The code's record, with the field names spelt out (stored as one letter)."""
        raw = await self.store.client.hgetall(self.store.keys.code(self.digest(code)))
        return {CODE_FIELDS.get(name, name): value for name, value in raw.items()}

    async def expires_ms(self, code: str) -> int:
        """The code's deadline (Redis time, ms)."""
        return int((await self.code_hash(code))["expires_ms"])

    async def sessions_of(self, runner_id: str) -> dict[str, Any]:
        """session_id -> session (internal JSON) of one runner's active sessions."""
        raw = await self.store.client.hgetall(self.store.keys.runner_sessions(runner_id))
        return {sid: json.loads(value) for sid, value in raw.items()}

    async def runner_session_count(self, runner_id: str) -> int:
        return int(await self.store.client.hlen(self.store.keys.runner_sessions(runner_id)))

    async def now_ms(self) -> int:
        """Redis time, ms."""
        secs, micros = await self.store.client.time()
        return int(secs) * 1000 + int(micros) // 1000
