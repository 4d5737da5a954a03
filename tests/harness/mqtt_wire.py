"""MQTT wire pieces for tests and benchmarks that write raw packets."""

from __future__ import annotations


def varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer (a packet's Remaining Length; MQTT 5 §1.5.5)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
