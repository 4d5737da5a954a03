"""The runner SDK against a hostile service: forged `session.opened` events on the broker.

No real service runs here: `FakeService` answers the runner's requests itself and
publishes whatever events it likes on the runner's `events` topic (what a compromised
service or broker can do; docs/protocol.md, "End-to-end keys and SAS").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sas import commitment, encode_commitment, key_id, parse_public_key
from mqtt_pairing.sdk import RunnerClient, SessionClosed, SessionOpened
from mqtt_pairing.sdk.e2e import KeyPair, new_nonce, read_nonce, reveal_data
from tests.sdk.support import SdkPeers

EVENT_TIMEOUT_S = 5.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class FakeService:
    """Answers `code` (with `max_uses`), `message` and `unpair`; records nonces and unpairs."""

    def __init__(self, client: aiomqtt.Client, prefix: str, runner_id: str, max_uses: int):
        self.client, self.prefix, self.runner_id = client, prefix, runner_id
        self.max_uses = max_uses
        self.runner_key: bytes | None = None
        self.nonces: dict[str, list[bytes]] = {}
        self.unpaired: list[str] = []

    async def serve(self) -> None:
        async for msg in self.client.messages:
            op = msg.topic.value.rsplit("/", 1)[-1]
            body = json.loads(msg.payload)
            result: dict[str, Any] = {}
            if op == "code":
                self.runner_key = parse_public_key(body["public_key"]).raw
                result = {
                    "code": "7KQ-M2X-9PZ",
                    "expires_at": _now(),
                    "ttl_s": 600,
                    "max_uses": self.max_uses,
                    "pairing_uri": f"mqtt-pairing://pair?code=7KQM2X9PZ&runner={self.runner_id}",
                }
            elif op == "message":
                nonce = read_nonce(body["data"])
                self.nonces.setdefault(body["session_id"], []).append(nonce)
                result = {"sent": True}
            elif op == "unpair":
                self.unpaired.append(body["session_id"])
                result = {"closed": 1}
            reply = {"request_id": body.get("request_id"), "ok": True, "result": result}
            topic = f"{self.prefix}/runners/{self.runner_id}/res/{op}"
            await self.client.publish(topic, json.dumps(reply), qos=1)

    def session(self, session_id: str, state: str = "active", **more: Any) -> dict[str, Any]:
        return {
            "session_id": session_id,
            "runner_id": self.runner_id,
            "app_id": "app-1",
            "runner_name": None,
            "app_name": None,
            "created_at": _now(),
            "last_seen_at": _now(),
            "state": state,
            **more,
        }

    async def event(self, name: str, **fields: Any) -> None:
        body = {"event": name, "event_id": str(uuid.uuid4()), "at": _now(), **fields}
        topic = f"{self.prefix}/runners/{self.runner_id}/events"
        await self.client.publish(topic, json.dumps(body), qos=1)

    async def opened(self, session_id: str, app_public_key: str | None) -> None:
        await self.event(
            "session.opened",
            session=self.session(session_id),
            app_public_key=app_public_key,
            app_metadata=None,
        )


@contextlib.asynccontextmanager
async def fake_service(
    address: BrokerAddress, prefix: str, runner_id: str, max_uses: int = 1
) -> AsyncIterator[FakeService]:
    async with aiomqtt.Client(
        address.host,
        address.port,
        identifier=f"fake-service-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(f"{prefix}/runners/{runner_id}/req/+", qos=1)
        service = FakeService(client, prefix, runner_id, max_uses)
        task = asyncio.create_task(service.serve())
        try:
            yield service
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _opened_events(runner: RunnerClient, count: int) -> list[SessionOpened]:
    seen: list[SessionOpened] = []
    async with asyncio.timeout(EVENT_TIMEOUT_S * 2):
        while len(seen) < count:
            event = await runner.next_event()
            if isinstance(event, SessionOpened):
                seen.append(event)
    return seen


@pytest.mark.parametrize("max_uses", [1, 3])
async def test_no_more_nonces_than_the_code_has_uses(
    max_uses: int, broker_address: BrokerAddress, topic_prefix: str, sdk: SdkPeers
) -> None:
    """A relay that opens many sessions naming one runner key grinds for a matching SAS
    (one guess per N_R); the runner runs one exchange per use of the code, then treats
    every further `session.opened` naming that key as tampering."""
    runner = sdk.runner(presence=False, e2e_timeout_s=1.0)
    forged = 10
    async with fake_service(broker_address, topic_prefix, runner.id, max_uses) as fake, runner:
        await runner.request_code(max_uses=max_uses)
        assert fake.runner_key is not None
        mallory = KeyPair.generate()
        hint = key_id(fake.runner_key)
        field = encode_commitment(commitment(mallory.public, new_nonce()), peer_key_id=hint)
        sessions = [str(uuid.uuid4()) for _ in range(forged)]
        for session_id in sessions:
            await fake.opened(session_id, field)
        seen = await _opened_events(runner, forged)
        assert {e.session.session_id for e in seen} == set(sessions)
        assert len(fake.nonces) == max_uses
        assert all(len(n) == 1 for n in fake.nonces.values())
        # Every one of them failed: retired key, or a commitment never revealed.
        assert [e.e2e for e in seen] == ["failed"] * forged
        assert all(e.sas is None for e in seen)
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while len(fake.unpaired) < forged:
                await asyncio.sleep(0.05)
        assert sorted(fake.unpaired) == sorted(sessions)


async def test_a_commitment_never_revealed_is_tampering(
    broker_address: BrokerAddress, topic_prefix: str, sdk: SdkPeers
) -> None:
    runner = sdk.runner(presence=False, e2e_timeout_s=0.5)
    async with fake_service(broker_address, topic_prefix, runner.id) as fake, runner:
        await runner.request_code()
        assert fake.runner_key is not None
        app = KeyPair.generate()
        field = app.commit(new_nonce(), peer_key_id=key_id(fake.runner_key))
        session_id = str(uuid.uuid4())
        await fake.opened(session_id, field)
        (opened,) = await _opened_events(runner, 1)
        assert list(fake.nonces) == [session_id]  # N_R went out; no reveal came back
        assert opened.e2e == "failed"
        assert opened.sas is None
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while fake.unpaired != [session_id]:
                await asyncio.sleep(0.05)


async def test_a_second_session_opened_for_one_session_does_not_stall_events(
    broker_address: BrokerAddress, topic_prefix: str, sdk: SdkPeers
) -> None:
    """The same session opened twice (two event ids): one exchange, and the events after
    it still reach user code once the exchange ends."""
    runner = sdk.runner(presence=False, e2e_timeout_s=1.0)
    async with fake_service(broker_address, topic_prefix, runner.id) as fake, runner:
        await runner.request_code()
        assert fake.runner_key is not None
        app, app_nonce = KeyPair.generate(), new_nonce()
        field = app.commit(app_nonce, peer_key_id=key_id(fake.runner_key))
        session_id = str(uuid.uuid4())
        for _ in range(2):
            await fake.opened(session_id, field)
            await asyncio.sleep(0.3)
        assert len(fake.nonces[session_id]) == 1
        await fake.event(
            "session.message",
            session_id=session_id,
            data=reveal_data(app, app_nonce),
            **{"from": "app"},
        )
        later = str(uuid.uuid4())
        await fake.opened(later, None)
        await fake.event(
            "session.closed", session=fake.session(later, "closed", closed_reason="unpaired_by_app")
        )
        first = await runner.next_event(timeout_s=EVENT_TIMEOUT_S)
        assert isinstance(first, SessionOpened)
        assert first.session.session_id == session_id
        assert first.e2e == "ready"
        second = await runner.next_event(timeout_s=EVENT_TIMEOUT_S)
        assert isinstance(second, SessionOpened)
        assert second.session.session_id == later
        assert second.e2e == "none"
        closed = await runner.next_event(timeout_s=EVENT_TIMEOUT_S)
        assert isinstance(closed, SessionClosed)
        assert closed.session.session_id == later
        assert fake.unpaired == []
