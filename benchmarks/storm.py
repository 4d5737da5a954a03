"""The presence storm's loaders: many runners' retained statuses and Last Wills, cheaply.

A runner announces itself with a retained `{"state":"online"}` on `P/runners/{id}/status`
(QoS 1) and leaves a Last Will `{"state":"offline"}`, retained, on the same topic
(docs/protocol.md "Presence"). To put N runners' statuses into a broker without N paho
clients, a few raw MQTT 3.1.1 connections publish the retained statuses (QoS 1, packet
ids recycled, PUBACKs read 1,000 at a time), and for the runners whose Last Will is to
fire, one short connection each carries the Will and is then dropped without DISCONNECT,
so that the broker publishes it (retained), exactly as it does for a runner that vanishes.

`count_recorded` checks, inside Redis (one EVAL), how many of the runners have the
expected presence recorded in their runner hash (`runner:{runner:<id>}`, docs/design.md
"Redis keys"; field `status`, as `record_status.lua` writes it).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

import redis

from tests.harness.mqtt_wire import varint

ONLINE = b'{"state":"online"}'
OFFLINE = b'{"state":"offline"}'
_PINGREQ = b"\xc0\x00"

COUNT_LUA = """
-- ARGV: key before the id, key after the id, id prefix, N, W (runners 0..W-1 offline)
local pre, suf, tag = ARGV[1], ARGV[2], ARGV[3]
local n, w = tonumber(ARGV[4]), tonumber(ARGV[5])
local ok, missing, wrong = 0, 0, 0
for i = 0, n - 1 do
  local v = redis.call('HGET', pre .. tag .. i .. suf, 'status')
  local want = 'online'
  if i < w then want = 'offline' end
  if not v then missing = missing + 1 elseif v == want then ok = ok + 1 else wrong = wrong + 1 end
end
return {ok, missing, wrong}
"""


def _s(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, will: tuple[str, bytes] | None = None) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session; with a retained QoS 1 Will if given."""
    flags = 0x02
    payload = _s(client_id.encode())
    if will is not None:
        flags |= 0x04 | 0x08 | 0x20  # will, will QoS 1, will retain
        payload += _s(will[0].encode()) + _s(will[1])
    var = _s(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    body = var + payload
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """PUBLISH, QoS 1, retained."""
    body = _s(topic.encode()) + struct.pack("!H", packet_id) + payload
    return bytes([0x30 | 0x02 | 0x01]) + varint(len(body)) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the loader connection")
        buf += chunk
    return bytes(buf)


def _open(
    host: str, port: int, client_id: str, will: tuple[str, bytes] | None = None
) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, will))
    return sock


def _connack(sock: socket.socket) -> None:
    ack = _read_exact(sock, 4)
    if ack[0] != 0x20 or ack[3] != 0:
        raise ConnectionError(f"loader: CONNECT refused ({ack.hex()})")


def publish_retained(
    host: str,
    port: int,
    items: list[tuple[str, bytes]],
    *,
    connections: int = 4,
    tag: str = "storm",
    progress: Callable[[float], None] | None = None,
) -> None:
    """Publish `items` (topic, payload) retained at QoS 1 over `connections` loaders.

    Returns once every PUBACK is in (the broker holds them all).
    """
    socks = [_open(host, port, f"{tag}-loader-{k}") for k in range(connections)]
    for sock in socks:
        _connack(sock)
    done = 0
    chunk = 1000
    for start in range(0, len(items), chunk * connections):
        batches = []
        for k, sock in enumerate(socks):
            lo = start + k * chunk
            part = items[lo : lo + chunk]
            if not part:
                continue
            sock.sendall(
                b"".join(
                    publish_packet(t, p, (lo + j) % 65535 + 1) for j, (t, p) in enumerate(part)
                )
            )
            batches.append((sock, len(part)))
        for sock, n in batches:
            acks = _read_exact(sock, 4 * n)
            if acks[0] != 0x40:
                raise ConnectionError(f"loader: unexpected packet {acks[:4].hex()}")
            done += n
        if progress is not None:
            progress(done / len(items))
    for sock in socks:
        sock.sendall(b"\xe0\x00")  # DISCONNECT
        sock.close()


def fire_wills(
    host: str,
    port: int,
    topics: list[str],
    *,
    tag: str = "storm",
    batch: int = 200,
    progress: Callable[[float], None] | None = None,
) -> None:
    """For each topic, a connection with a retained QoS 1 Will `{"state":"offline"}` that
    is then dropped without DISCONNECT: the broker publishes the Will."""
    for start in range(0, len(topics), batch):
        part = topics[start : start + batch]
        socks = [
            _open(host, port, f"{tag}-will-{start + j}", (t, OFFLINE)) for j, t in enumerate(part)
        ]
        for sock in socks:
            _connack(sock)
        for sock in socks:
            sock.close()  # no DISCONNECT: an unexpected loss, the Will goes out
        if progress is not None:
            progress(min(1.0, (start + len(part)) / len(topics)))


def ping(host: str, port: int, tag: str = "storm") -> None:
    """One round trip to the broker (CONNECT, PINGREQ): it has handled what came before."""
    sock = _open(host, port, f"{tag}-ping")
    try:
        _connack(sock)
        sock.sendall(_PINGREQ)
        _read_exact(sock, 2)
        sock.sendall(b"\xe0\x00")
    finally:
        sock.close()


def count_recorded(
    client: redis.Redis, key_template: tuple[str, str], id_prefix: str, n: int, wills: int
) -> dict[str, Any]:
    """How many of runners `id_prefix0 .. id_prefix(n-1)` have their expected presence
    recorded (the first `wills` offline, the others online): one EVAL, N HGETs inside."""
    ok, missing, wrong = client.eval(  # type: ignore[misc]
        COUNT_LUA, 0, key_template[0], key_template[1], id_prefix, n, wills
    )
    return {"ok": int(ok), "missing": int(missing), "wrong": int(wrong)}
