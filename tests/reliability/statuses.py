"""Many runners' status messages at once, and the presence Redis recorded for them.

- `publish_statuses`: publishes retained status messages from a process of its own (so
  that it shares no interpreter lock with a service under test), as fast as the broker
  takes them: one MQTT 3.1.1 connection (`StatusFlood`, paho) at QoS 1 with up to 1,000
  in flight (MQTT 3.1.1, because Mosquitto announces its `max_inflight_messages` (20) as
  the Receive Maximum of MQTT 5 clients, which would throttle the flood).
- `recorded_states`: runner id -> the status Redis recorded (`None`: nothing recorded);
  `wait_recorded` waits (bounded) until Redis records the expected statuses.
- `queue_limits`: the queue-limit lines of the shipped `broker-config/mosquitto.conf`.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store.keys import KeySchema
from tests.harness.servers import REPO_ROOT

State = Literal["online", "offline"]
PUBLISH_TIMEOUT_S = 120.0
SHIPPED_CONF = REPO_ROOT / "broker-config" / "mosquitto.conf"


def queue_limits() -> str:
    """The `max_queued_*` / `max_inflight_*` lines of the shipped mosquitto.conf."""
    lines = SHIPPED_CONF.read_text().splitlines()
    wanted = re.compile(r"^(max_queued_messages|max_queued_bytes|max_inflight_messages)\s")
    return "".join(f"{line}\n" for line in lines if wanted.match(line))


class StatusFlood:
    """Publishes retained statuses `P/runners/{id}/status` (blocking; use `to_thread`)."""

    def __init__(self, address: BrokerAddress, prefix: str) -> None:
        self.prefix = prefix
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"flood-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self._acked = 0
        self._lock = threading.Condition()
        self.client.on_publish = self._on_publish
        self.client.connect(address.host, address.port, keepalive=60)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("the status flood did not connect")
            time.sleep(0.01)

    def _on_publish(self, *_args: object) -> None:
        with self._lock:
            self._acked += 1
            self._lock.notify_all()

    def topic(self, runner_id: str) -> str:
        return f"{self.prefix}/runners/{runner_id}/status"

    def publish(self, states: Sequence[tuple[str, State]]) -> float:
        """Publish every (runner, state) in order; wait for all PUBACKs. Seconds taken."""
        started = time.monotonic()
        with self._lock:
            target = self._acked + len(states)
        for sent, (runner_id, state) in enumerate(states):
            if sent % 10_000 == 0:  # paho holds at most 65535 unacknowledged messages
                self._wait_acked(target - len(states) + sent - 10_000)
            body = json.dumps({"state": state})
            info = self.client.publish(self.topic(runner_id), body, qos=1, retain=True)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"publish refused: {mqtt.error_string(info.rc)}")
        self._wait_acked(target)
        return time.monotonic() - started

    def _wait_acked(self, count: int) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: self._acked >= count, PUBLISH_TIMEOUT_S):
                raise TimeoutError(f"{count - self._acked} statuses not acknowledged")

    def clear(self, runner_ids: Iterable[str]) -> None:
        """Delete the retained statuses (zero-length retained publish)."""
        ids = list(runner_ids)
        with self._lock:
            target = self._acked + len(ids)
        for runner_id in ids:
            self.client.publish(self.topic(runner_id), b"", qos=1, retain=True)
        with self._lock:
            self._lock.wait_for(lambda: self._acked >= target, PUBLISH_TIMEOUT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_statuses(
    address: BrokerAddress, prefix: str, states: Sequence[tuple[str, State]]
) -> float:
    """Publish (runner, state) pairs in order from another process (blocking; use
    `to_thread`); returns the seconds from its first publish to its last PUBACK."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "states.txt"
        path.write_text("".join(f"{runner} {state}\n" for runner, state in states))
        command = [sys.executable, "-m", "tests.reliability.statuses"]
        command += [address.host, str(address.port), prefix, str(path)]
        done = subprocess.run(
            command,
            check=False,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10 * PUBLISH_TIMEOUT_S,
        )
    if done.returncode != 0:
        raise RuntimeError(f"status publisher failed:\n{done.stderr[-2000:]}")
    return float(done.stdout.split()[-1])


def _main(host: str, port: str, prefix: str, path: str) -> None:
    states: list[tuple[str, State]] = []
    for line in Path(path).read_text().splitlines():
        runner, state = line.split()
        states.append((runner, "online" if state == "online" else "offline"))
    flood = StatusFlood(BrokerAddress(host, int(port)), prefix)
    try:
        print(f"{flood.publish(states):.3f}")  # the parent reads it
    finally:
        flood.close()


def recorded_states(
    client: redis.Redis, keys: KeySchema, runner_ids: Sequence[str]
) -> dict[str, str | None]:
    """runner id -> the status recorded in its runner hash, or None."""
    out: dict[str, str | None] = {}
    for start in range(0, len(runner_ids), 5000):
        chunk = runner_ids[start : start + 5000]
        pipe = client.pipeline(transaction=False)
        for runner_id in chunk:
            pipe.hget(keys.runner(runner_id), "status")
        for runner_id, value in zip(chunk, pipe.execute(), strict=True):
            out[runner_id] = None if value is None else str(value)
    return out


async def wait_recorded(
    client: redis.Redis,
    keys: KeySchema,
    expected: dict[str, State],
    timeout_s: float,
    what: str,
) -> float:
    """Wait until Redis records every expected status; seconds waited.

    The check reads Redis from a thread: a pipeline of many thousand reads run in the
    event loop would stall the service under test for as long.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        left = await asyncio.to_thread(mismatches, client, keys, expected)
        if not left:
            return loop.time() - started
        if loop.time() - started > timeout_s:
            sample = list(left.items())[:5]
            pytest.fail(
                f"{what}: {len(left)} of {len(expected)} runners still wrong, e.g. {sample}"
            )
        await asyncio.sleep(0.2)


def mismatches(
    client: redis.Redis, keys: KeySchema, expected: dict[str, State]
) -> dict[str, str | None]:
    """Runners whose recorded status is not the expected one: id -> what is recorded."""
    got = recorded_states(client, keys, list(expected))
    return {r: got[r] for r, want in expected.items() if got[r] != want}


if __name__ == "__main__":
    _main(*sys.argv[1:])
