"""The Redis store: key templates, Lua scripts and the store class over redis-py asyncio."""

from __future__ import annotations

from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.store.redis_store import PairingStore, connect_redis

__all__ = ["KeySchema", "PairingStore", "connect_redis"]
