"""Simulated peers: runners and apps (the SDK clients), and a runner's presence link.

- `Peers(address, prefix)`: `peers.runner(id)` / `peers.app(id)` make a `RunnerClient` /
  `AppClient` on one broker and topic prefix (MQTT 5 unless told `protocol="3.1.1"`);
  use them with `async with`.
- `StatusLink`: a runner's presence connection (paho, its own network thread) with a
  retained Last Will `{"state":"offline"}` and a short keepalive; it publishes its status,
  disconnects cleanly, goes silent (keepalive timeout) or resets its socket (crash).
- `clear_retained(address, topics)`: delete retained messages a test left behind.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.mqtt_address import BrokerAddress

CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 5.0


@dataclass
class Peers:
    """Makes runners and apps on one broker and prefix; use them as `async with`."""

    address: BrokerAddress
    prefix: str

    def runner(
        self, ident: str = "r1", protocol: Literal["5", "3.1.1"] = "5", **kwargs: Any
    ) -> RunnerClient:
        return RunnerClient(ident, self.address, prefix=self.prefix, protocol=protocol, **kwargs)

    def app(
        self, ident: str = "a1", protocol: Literal["5", "3.1.1"] = "5", **kwargs: Any
    ) -> AppClient:
        return AppClient(ident, self.address, prefix=self.prefix, protocol=protocol, **kwargs)


# ---- a runner's presence connection -----------------------------------------------------

OFFLINE = json.dumps({"state": "offline"}).encode()


class StatusLink:
    """A runner's presence connection: retained status and Last Will, paho network thread.

    The broker sees it as the runner (anonymous test broker); the service only looks at
    the topic `P/runners/{id}/status`.
    """

    def __init__(self, address: BrokerAddress, prefix: str, runner_id: str, keepalive_s: int):
        self.topic = f"{prefix}/runners/{runner_id}/status"
        self.keepalive_s = keepalive_s
        self.address = address
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"status-{runner_id}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.will_set(self.topic, OFFLINE, qos=1, retain=True)
        self.dropped_at: float | None = None
        self._looping = False

    def connect(self) -> None:
        """Connect and start the network thread (blocking; call via `to_thread`)."""
        self.client.connect(self.address.host, self.address.port, keepalive=self.keepalive_s)
        self.client.loop_start()
        self._looping = True
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self.client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("status link did not connect")
            time.sleep(0.01)

    def publish(self, state: Literal["online", "offline"]) -> None:
        """Publish the retained status and wait for its PUBACK (blocking)."""
        info = self.client.publish(self.topic, json.dumps({"state": state}), qos=1, retain=True)
        info.wait_for_publish(REPLY_TIMEOUT_S)
        assert info.is_published()

    def disconnect(self) -> None:
        """A clean DISCONNECT: the broker discards the Will (blocking)."""
        self.client.disconnect()
        self.client.loop_stop()
        self._looping = False

    def go_silent(self) -> None:
        """Stop the network thread without a DISCONNECT: no more PINGREQ, socket open.

        The broker disconnects the client after keepalive x 1.5 and publishes its Will.
        """
        self.client.loop_stop()
        self._looping = False
        self.dropped_at = time.monotonic()

    def reset(self) -> None:
        """Drop the TCP connection with a RST (as a crashed process would): no DISCONNECT."""
        self.client.loop_stop()
        self._looping = False
        sock = self.client.socket()
        assert sock is not None
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.dropped_at = time.monotonic()
        sock.close()

    def close(self) -> None:
        """Release the client whatever state it is in (teardown)."""
        if self._looping:
            with contextlib.suppress(Exception):
                self.client.disconnect()
            self.client.loop_stop()
            self._looping = False
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def clear_retained(address: BrokerAddress, topics: list[str]) -> None:
    """Delete retained messages (zero-length retained publish), so tests leave none behind."""
    if not topics:
        return
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"clear-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
    )
    client.connect(address.host, address.port, keepalive=10)
    client.loop_start()
    try:
        for topic in topics:
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(REPLY_TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
