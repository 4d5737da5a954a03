"""The ceiling of the stack: an echo service with the gateway's MQTT client and no Redis.

`python -m benchmarks.echo --url mqtt://127.0.0.1:PORT --prefix P --group G`

It is built like `mqtt_pairing.gateway.PairingGateway`, minus the dispatcher: aiomqtt
(paho underneath) with MQTT 5, TCP_NODELAY, manual acknowledgement after the reply, one
task per request under the same in-flight bound, shared subscription on the same topic
filters. For each pair request it publishes what a successful pair publishes, at QoS 1 and
awaited one after the other as the gateway does: the reply, `session.opened` to the runner
and to the app, and `code.used` to the runner (4 publishes), with payloads of the same
shape and size. The request carries the runner id (the echo has no Redis to find it in).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
import uuid
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.models import format_ts
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from mqtt_pairing.services.events import event_id
from mqtt_pairing.topics import Kind, TopicScheme

MAX_INFLIGHT = 256
REPLY_EXPIRY_S = 600


def _props() -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.MessageExpiryInterval = REPLY_EXPIRY_S
    return props


_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


def _dumps(obj: Any) -> bytes:
    return _COMPACT_JSON.encode(obj).encode()


class Echo:
    """Answers pair requests like a pair does, without looking anything up."""

    def __init__(
        self,
        address: BrokerAddress,
        prefix: str,
        group: str,
        client_id: str,
        max_inflight: int | None = None,
    ) -> None:
        self.scheme = TopicScheme(prefix)
        self.group = group
        self.client = aiomqtt.Client(
            address.host,
            address.port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            socket_options=[NODELAY],
            max_queued_incoming_messages=MAX_INFLIGHT * 4,
            # None: paho's default (20 QoS 1 publishes awaiting PUBACK), as in the gateway.
            max_inflight_messages=max_inflight,
            timeout=10,
        )
        self.client._client.manual_ack_set(True)
        # As the gateway: its properties built once, and aiomqtt's pending-publish
        # warning threshold following the in-flight limit.
        self.client.pending_calls_threshold = 8 * MAX_INFLIGHT
        self._props = _props()
        self._inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self.handled = 0

    async def run(self, stopping: asyncio.Event) -> None:
        async with self.client:
            for kind in Kind:
                await self.client.subscribe(self.scheme.request_filter(kind, self.group), qos=1)
            await self.client.subscribe(self.scheme.status_filter(), qos=1)
            print("echo ready", flush=True)
            # As the gateway's serve loop: one reader task, cancelled on stop.
            reader = asyncio.ensure_future(self._read())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({reader, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await reader
            if self._tasks:
                await asyncio.wait(set(self._tasks), timeout=5)

    async def _read(self) -> None:
        messages = self.client.messages
        while True:
            await self._inflight.acquire()
            try:
                message = await anext(messages)
            except BaseException:
                self._inflight.release()
                raise
            task = asyncio.create_task(self._process(message))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._inflight.release()

    async def _process(self, message: aiomqtt.Message) -> None:
        try:
            await self._answer(message)
        finally:
            with contextlib.suppress(Exception):
                self.client._client.ack(message.mid, message.qos)

    async def _answer(self, message: aiomqtt.Message) -> None:
        parsed = self.scheme.parse_request(message.topic.value)
        body = json.loads(bytes(message.payload))  # type: ignore[arg-type]
        if not hasattr(parsed, "identity") or not isinstance(body, dict):
            return
        app_id = parsed.identity.id
        runner_id = str(body.get("runner", "runner"))
        request_id = str(body.get("request_id"))
        now_ms = int(time.time() * 1000)
        session_id = str(uuid.uuid4())
        at = format_ts(now_ms)
        session = {
            "session_id": session_id,
            "runner_id": runner_id,
            "app_id": app_id,
            "runner_name": None,
            "app_name": None,
            "created_at": at,
            "last_seen_at": at,
            "state": "active",
        }
        reply = {
            "ok": True,
            "request_id": request_id,
            "result": {"session": session, "runner_public_key": None, "runner_metadata": None},
        }
        opened = {
            "event": "session.opened",
            "event_id": event_id(session_id, "opened"),
            "at": at,
            "session": session,
            "app_public_key": None,
            "app_metadata": None,
        }
        used = {
            "event": "code.used",
            "event_id": event_id(session_id, "code.used"),
            "at": at,
            "uses_left": 0,
        }
        prefix = self.scheme.prefix
        await self.client.publish(
            f"{prefix}/apps/{app_id}/res/pair", _dumps(reply), qos=1, properties=self._props
        )
        opened_body = _dumps(opened)  # one payload for both parties, as the gateway does
        for topic, body in (
            (f"{prefix}/runners/{runner_id}/events", opened_body),
            (f"{prefix}/apps/{app_id}/events", opened_body),
            (f"{prefix}/runners/{runner_id}/events", _dumps(used)),
        ):
            await self.client.publish(topic, body, qos=1, properties=self._props)
        self.handled += 1


async def _main(args: argparse.Namespace) -> None:
    address = BrokerAddress.from_url(args.url)
    echo = Echo(address, args.prefix, args.group, args.client_id, args.max_inflight)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await echo.run(stopping)
    print(f"echo handled {echo.handled}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--prefix", default="echo")
    parser.add_argument("--group", default="bench-echo")
    parser.add_argument("--client-id", default=f"bench-echo-{uuid.uuid4().hex[:8]}")
    parser.add_argument(
        "--max-inflight", type=int, default=None, help="paho's cap on unacknowledged publishes"
    )
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
