"""A separate OS process that makes requests through its own Dispatcher and Redis client.

`python -m tests.races.worker CONFIG_FILE JOB_FILE` reads its configuration (JSON), connects
to Redis as a service instance would (its own `PairingStore`, its own connections), prints
`ready`, waits at a barrier (BLPOP on the `go_key`, pushed once for each worker by the
test), reads the job (written by the test meanwhile, so it may name codes issued after
the workers started), then makes
every request of the job at once (each after its own `delay_ms`, when it has one; at most
`IN_FLIGHT` at a time) and
prints one JSON line per request: `{"i": ..., "reply": ..., "start_ms": ..., "done_ms": ...}`
(Redis time just before the request was handled, and just after).

Configuration: `{"redis_url", "cluster", "key_prefix", "settings": {...}, "go_key"}`;
job: `[{"kind": "runner"|"app", "id", "op", "body", "delay_ms"?}, ...]`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from mqtt_pairing.config import load_settings
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from mqtt_pairing.topics import Identity, Kind

SECRET = b"race-secret-" + b"s" * 32
BARRIER_TIMEOUT_S = 60
IN_FLIGHT = 64
"""Requests of one worker in flight at once, as a gateway's in-flight window bounds them
(and below redis-py's pool of 100 connections, which raises when it runs out)."""


async def _now_ms(client: aioredis.Redis) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def main(job: dict[str, Any], job_file: Path) -> None:
    settings = load_settings(pairing_key_prefix=job["key_prefix"], **job.get("settings", {}))
    client = connect_redis(job["redis_url"], timeout_s=10.0, cluster=bool(job.get("cluster")))
    store = PairingStore(client, KeySchema(job["key_prefix"]))
    dispatcher = Dispatcher(store, settings, SECRET)
    await store.ping()
    barrier = connect_redis(
        job["redis_url"], timeout_s=BARRIER_TIMEOUT_S + 5, cluster=bool(job.get("cluster"))
    )
    print("ready", flush=True)
    try:
        if await barrier.blpop([job["go_key"]], timeout=BARRIER_TIMEOUT_S) is None:
            raise SystemExit("no go within the barrier timeout")
        requests: list[dict[str, Any]] = json.loads(job_file.read_text())

        window = asyncio.Semaphore(IN_FLIGHT)

        async def one(i: int, request: dict[str, Any]) -> None:
            if request.get("delay_ms"):
                await asyncio.sleep(request["delay_ms"] / 1000)  # when to send it
            async with window:
                start_ms = await _now_ms(client)
                handled = await dispatcher.handle(
                    Identity(Kind(request["kind"]), request["id"]),
                    request["op"],
                    json.dumps(request["body"]).encode(),
                )
            done_ms = await _now_ms(client)
            line = {"i": i, "reply": handled.reply, "start_ms": start_ms, "done_ms": done_ms}
            print(json.dumps(line), flush=True)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    finally:
        await barrier.aclose()
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])))
