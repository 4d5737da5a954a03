"""The parts that run the service in this process: Redis round trips and Redis memory.

Round trips: a real service (`build_service`, the gateway included) on the harness's
Mosquitto and Redis, driven by the load generator one request at a time. Counts come from
`PairingStore.round_trips` (a pipeline counts as one); each round trip is also labelled
with what it ran and whether it happened before the reply was published (the request
path) or after (outbox acknowledgement, history). `INFO commandstats` deltas give the
commands, those run inside Lua scripts included. The outbox sweep is set to run once an
hour, so that only requests make round trips while counting.

Memory: codes and sessions made through the dispatcher and the outbox relay, exactly as
the gateway calls them but without MQTT (a no-op publish), then `INFO memory` deltas and
`MEMORY USAGE` of every key, grouped by key family; and code hashes alone, 100k at a time,
through the filler script (same fields and TTL as issue_code.lua).
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import redis

from benchmarks.loadgen import LoadGenerator
from benchmarks.stack import (
    KEY_PREFIX,
    SECRET,
    CodeFactory,
    Servers,
    bench_settings,
    commandstats,
    commandstats_delta,
)
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.service import build_service
from mqtt_pairing.services.events import Event
from mqtt_pairing.services.outbox import OutboxRelay
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis
from mqtt_pairing.store.redis_store import RawCall
from mqtt_pairing.topics import Identity, Kind

Progress = Callable[[float, str], None]


def _label(frame: Any) -> str:
    """What a round trip ran, from the store method that made it."""
    name = frame.f_code.co_name
    local = frame.f_locals
    if name == "batch":
        calls = local.get("calls") or []
        names = [c.name if hasattr(c, "name") else str(c.args[0]) for c in calls]
        counted = Counter(names)
        return (
            "pipeline["
            + ", ".join(f"{n}\u00d7{k}" if k > 1 else n for n, k in counted.items())
            + "]"
        )
    if name == "_run":
        return str(local.get("name"))
    if name == "call":
        call = local.get("call")
        return str(call.args[0]) if call is not None and hasattr(call, "args") else name
    return f"{name} (direct command)"


def _command_of(awaitable: Any) -> str | None:
    """The command of an unstarted redis-py coroutine (`execute_command(*args)`)."""
    frame = getattr(awaitable, "cr_frame", None)
    args = frame.f_locals.get("args") if frame is not None else None
    if args and isinstance(args[0], str):
        return args[0].upper()
    return None


async def count_round_trips(
    servers: Servers, *, n_ok: int, n_fail: int, progress: Progress
) -> dict[str, Any]:
    """Round trips and commands per successful pair and per failed guess."""
    prefix = f"rt{uuid.uuid4().hex[:4]}"
    settings = bench_settings(
        mqtt_url=servers.mosquitto.url,
        redis_url=servers.redis.url,
        pairing_topic_prefix=prefix,
        pairing_shared_group="bench-rt",
        pairing_sweep_interval_s=3600,
        mqtt_client_id=f"bench-rt:{uuid.uuid4().hex[:6]}",
    )
    service = await build_service(settings)
    store = service.store
    gateway = service.gateway
    phase = {"now": "idle"}
    trace: list[tuple[str, str]] = []
    processed = threading.Event()

    original_guard = store._guard

    def traced_guard(awaitable: Any) -> Any:
        label = _label(sys._getframe(1))
        command = _command_of(awaitable)
        if label.endswith("(direct command)") and command:
            label = f"{command} (in {label.split(' ')[0]})"
        trace.append((phase["now"], label))
        return original_guard(awaitable)

    original_handle = gateway.dispatcher.handle

    async def traced_handle(*args: Any, **kwargs: Any) -> Any:
        phase["now"] = "request"
        return await original_handle(*args, **kwargs)

    original_reply = gateway._reply

    async def traced_reply(*args: Any) -> None:
        phase["now"] = "after"
        await original_reply(*args)

    original_process = gateway._process

    async def traced_process(message: Any) -> None:
        try:
            await original_process(message)
        finally:
            phase["now"] = "idle"
            processed.set()

    store._guard = traced_guard  # type: ignore[method-assign]
    gateway.dispatcher.handle = traced_handle  # type: ignore[method-assign]
    gateway._reply = traced_reply  # type: ignore[method-assign]
    gateway._process = traced_process  # type: ignore[method-assign]

    rclient = servers.redis_client()
    factory = CodeFactory(rclient)
    run = asyncio.create_task(service.run())
    try:
        await asyncio.wait_for(gateway.connected.wait(), 15)
        await asyncio.sleep(1.0)  # the first outbox sweep runs at start
        gen = LoadGenerator(servers.mosquitto.host, servers.mosquitto.port, prefix)
        await asyncio.to_thread(gen.start)
        out: dict[str, Any] = {}
        for kind, n in (("success", n_ok), ("failed_guess", n_fail)):
            jobs = factory.issue(n, "rt") if kind == "success" else factory.wrong_guesses(n)
            trace.clear()
            rclient.config_resetstat()
            rt0 = store.round_trips

            marks: list[int] = []

            def drive(
                jobs: Any = jobs, kind: str = kind, n: int = n, marks: list[int] = marks
            ) -> list[str]:
                errors: list[str] = []
                for i in range(n):
                    processed.clear()
                    ok, err = gen.send_one(jobs.popleft())
                    if not processed.wait(10):
                        raise TimeoutError("the service did not finish a request")
                    marks.append(len(trace))
                    errors.append("" if ok else err)
                    progress((i + 1) / n, f"round trips: {kind} {i + 1}/{n}")
                return errors

            errors = await asyncio.to_thread(drive)
            await asyncio.sleep(0.2)
            stats = commandstats_delta({}, commandstats(rclient))
            stats.pop("config|resetstat", None)
            stats.pop("info", None)
            total = store.round_trips - rt0
            by_phase = Counter(p for p, _ in trace)
            labels = Counter((p, label) for p, label in trace)
            per_request = [b - a for a, b in zip([0, *marks], marks, strict=False)]
            out[kind] = {
                "min_per_request": min(per_request),
                "max_per_request": max(per_request),
                "requests": n,
                "outcomes": dict(Counter(e or "ok" for e in errors)),
                "round_trips_per_request": total / n,
                "request_path_per_request": by_phase["request"] / n,
                "after_reply_per_request": by_phase["after"] / n,
                "round_trips": [
                    {"phase": p, "what": label, "per_request": k / n}
                    for (p, label), k in sorted(labels.items(), key=lambda x: x[0][0] != "request")
                ],
                "commands_per_request": {c: k / n for c, k in sorted(stats.items())},
                "top_level_commands_per_request": sum(
                    k for c, k in stats.items() if c in ("evalsha", "eval")
                )
                / n,
            }
        await asyncio.to_thread(gen.close)
        return out
    finally:
        service.stop()
        await asyncio.wait_for(run, 30)
        await service.close()
        rclient.close()


async def round_trip_cpu(servers: Servers, *, batches: int) -> dict[str, Any]:
    """The service's own CPU per Redis round trip and per command in it (µs).

    `PairingStore.batch` on a connection made by `connect_redis`, one batch at a time,
    `time.process_time` over `batches` batches of 1 and of 9 commands (GET of a missing
    key, and EVALSHA of a small script): the fixed cost of a round trip is what a batch of
    one costs, the cost of a command the slope. Redis's own time is not in it (the loop
    waits in epoll meanwhile).
    """
    store = PairingStore(connect_redis(servers.redis.url), KeySchema(f"cpu{uuid.uuid4().hex[:4]}"))
    try:
        script = store.outbox_due_call("cpu-r1", delay_s=5, shards=1)
        get = RawCall(("GET", f"{store.keys.prefix}:none"))
        out: dict[str, Any] = {"batches": batches}
        for name, call in (("get", get), ("evalsha", script)):
            costs = []
            for size in (1, 9):
                calls = [call] * size
                for _ in range(min(200, batches)):
                    await store.batch(calls)
                t = time.process_time()
                for _ in range(batches):
                    await store.batch(calls)
                costs.append((time.process_time() - t) / batches * 1e6)
            out[name] = {"batch_of_1_us": costs[0], "per_command_us": (costs[1] - costs[0]) / 8}
        return out
    finally:
        await store.aclose()


# ---- memory ---------------------------------------------------------------------------

_TAG = re.compile(r"\{(\w+):[^}]*\}")


_AFTER_TAG = re.compile(r"^(code:\{c:\*\}):[0-9a-f]{24}|^(tomb:\{c:\*\}):\d+:\d+")


def key_family(key: str) -> str:
    """`pairing:runner:{runner:r-1}:sessions` -> `runner:{runner:*}:sessions`.

    A code's digest and a tombstone string's window after the tag become `<digest>` and
    `<window>`.
    """
    fam = _TAG.sub(r"{\1:*}", key.removeprefix(f"{KEY_PREFIX}:"))
    if fam.startswith("dedupe:"):
        fam = fam.rsplit(":", 1)[0] + ":<request_id>"
    return _AFTER_TAG.sub(
        lambda m: f"{m.group(1)}:<digest>" if m.group(1) else f"{m.group(2)}:<window>:<bucket>",
        fam,
    )


def memory_by_family(client: redis.Redis) -> dict[str, dict[str, int]]:
    """Keys and MEMORY USAGE bytes by key family (every key; for small databases)."""
    fams: dict[str, dict[str, int]] = {}
    keys = list(client.scan_iter(count=5000))
    for start in range(0, len(keys), 500):
        pipe = client.pipeline(transaction=False)
        chunk = keys[start : start + 500]
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(chunk, pipe.execute(), strict=True):
            f = fams.setdefault(key_family(key), {"keys": 0, "bytes": 0})
            f["keys"] += 1
            f["bytes"] += int(used or 0)
    return fams


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def _family_delta(
    before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], n: int
) -> list[dict[str, Any]]:
    rows = []
    for fam, a in after.items():
        b = before.get(fam, {"keys": 0, "bytes": 0})
        dk, db = a["keys"] - b["keys"], a["bytes"] - b["bytes"]
        if dk or db:
            rows.append(
                {
                    "family": fam,
                    "keys_per_item": dk / n,
                    "bytes_per_item": db / n,
                    "keys": a["keys"],
                }
            )
    for fam, b in before.items():
        if fam not in after:
            rows.append(
                {
                    "family": fam,
                    "keys_per_item": -b["keys"] / n,
                    "bytes_per_item": -b["bytes"] / n,
                    "keys": 0,
                }
            )
    return sorted(rows, key=lambda r: -r["bytes_per_item"])


def _stream_cost(client: redis.Redis, n: int = 1000, small: int = 512) -> dict[str, Any]:
    """Bytes of a one-entry stream with the default stream-node-max-bytes and a small one."""
    default = int(client.config_get("stream-node-max-bytes")["stream-node-max-bytes"])
    fields = {"event": "code.issued", "runner_id": "r-123456", "code_mask": "7**-***-*** #abcd"}
    out: dict[str, Any] = {"default_setting": default, "small_setting": small}
    try:
        for label, setting in (("default", default), ("small", small)):
            client.config_set("stream-node-max-bytes", setting)
            m0 = _used_memory(client)
            pipe = client.pipeline(transaction=False)
            for i in range(n):
                pipe.xadd(f"bench-stream:{label}:{i}", fields)
            pipe.execute()
            out[label] = (_used_memory(client) - m0) / n
            client.delete(*[f"bench-stream:{label}:{i}" for i in range(n)])
    finally:
        client.config_set("stream-node-max-bytes", default)
    return out


def _hash_variants(client: redis.Redis, n: int = 20_000) -> list[dict[str, Any]]:
    """Bytes per code hash for the current layout and two leaner ones (HSET + PEXPIRE)."""
    now = int(time.time() * 1000)
    runner = "r-0123456789abcdef"
    variants: list[tuple[str, Callable[[int], str], dict[str, Any]]] = [
        (
            "until 2026-11-29: 8 fields with full names, 128-bit digest",
            lambda i: f"{KEY_PREFIX}:code:{{code:{i:032x}}}",
            {"runner_id": runner, "state": "active", "max_uses": 1, "uses_left": 1,
             "created_ms": now, "expires_ms": now + 600_000, "first": "7", "fp": "1a2b3c4d"},
        ),
        (
            "7 fields, one-letter names, 128-bit digest",
            lambda i: f"{KEY_PREFIX}:code:{{code:{i:032x}}}",
            {"r": runner, "s": "active", "m": 1, "u": 1, "c": now, "e": now + 600_000,
             "f": "7"},
        ),
        (
            "as issue_code.lua: 7 fields, one-letter names, 96-bit digest",
            lambda i: f"{KEY_PREFIX}:code:{{c:{i % 256:02x}}}:{i:024x}",
            {"r": runner, "s": "active", "m": 1, "u": 1, "c": now, "e": now + 600_000,
             "f": "7"},
        ),
    ]  # fmt: skip
    out = []
    for label, key, fields in variants:
        m0 = _used_memory(client)
        for start in range(0, n, 1000):
            pipe = client.pipeline(transaction=False)
            for i in range(start, start + 1000):
                pipe.hset(key(i), mapping=fields)
                pipe.pexpire(key(i), 4_200_000)
            pipe.execute()
        used = (_used_memory(client) - m0) / n
        usage = int(client.memory_usage(key(0), samples=0) or 0)
        out.append({"layout": label, "used_memory_per_code": used, "memory_usage": usage})
        client.flushall()
    return out


async def measure_memory(
    servers: Servers, *, n_full: int, n_bulk: int, progress: Progress
) -> dict[str, Any]:
    """Bytes per code and per session, with where they go; FLUSHALLs the harness's Redis."""
    rclient = servers.redis_client()
    rclient.flushall()
    settings = bench_settings(redis_url=servers.redis.url)
    # 100 requests at a time open as many connections: on a loaded machine the default
    # 1 s timeout turns slow connects into SERVICE_UNAVAILABLE; this step measures bytes.
    store = PairingStore(connect_redis(servers.redis.url, timeout_s=10.0), KeySchema(KEY_PREFIX))
    dispatcher = Dispatcher(store, settings, SECRET.encode())

    async def no_publish(_events: list[Event]) -> None:
        return None

    relay = OutboxRelay(store, settings, no_publish, dispatcher.history)

    async def process(identity: Identity, op: str, body: dict[str, Any]) -> dict[str, Any]:
        # What PairingGateway._process_inner does around the dispatcher, minus MQTT.
        handled = await dispatcher.handle(identity, op, json.dumps(body).encode(), defer=True)
        if handled.outbox or handled.after:
            await relay.deliver(
                handled.outbox,
                marked=handled.outbox_marked,
                after=handled.after,
                recorded=handled.recorded,
            )
        await dispatcher.history.record(handled.history)
        assert handled.reply is not None
        assert handled.reply["ok"], handled.reply
        return handled.reply

    out: dict[str, Any] = {"n_full": n_full, "n_bulk": n_bulk}
    try:
        await store.ping()
        # 1. Codes through the `code` op, each from its own runner.
        runners = [f"mem-r-{i}" for i in range(n_full)]
        fam0 = memory_by_family(rclient)
        m0 = _used_memory(rclient)
        codes: list[str] = []
        t = time.perf_counter()
        for start in range(0, n_full, 100):
            chunk = runners[start : start + 100]
            replies = await asyncio.gather(
                *(
                    process(Identity(Kind.RUNNER, r), "code", {"request_id": uuid.uuid4().hex})
                    for r in chunk
                )
            )
            codes += [rep["result"]["code"] for rep in replies]
            progress(len(codes) / n_full / 2, f"memory: {len(codes)} codes via the dispatcher")
        out["code_op_per_s"] = n_full / (time.perf_counter() - t)
        m1 = _used_memory(rclient)
        fam1 = memory_by_family(rclient)
        out["code_request_bytes"] = (m1 - m0) / n_full
        out["code_request_families"] = _family_delta(fam0, fam1, n_full)

        # 2. Pair every code (100 apps), through the `pair` op.
        apps = [f"mem-a-{i}" for i in range(100)]
        for start in range(0, n_full, 100):
            await asyncio.gather(
                *(
                    process(
                        Identity(Kind.APP, apps[i % len(apps)]),
                        "pair",
                        {"request_id": uuid.uuid4().hex, "code": codes[i]},
                    )
                    for i in range(start, min(n_full, start + 100))
                )
            )
            progress(0.5 + (start + 100) / n_full / 4, "memory: pairing them")
        m2 = _used_memory(rclient)
        fam2 = memory_by_family(rclient)
        out["pair_bytes"] = (m2 - m1) / n_full
        out["pair_families"] = _family_delta(fam1, fam2, n_full)

        # 3. A single-entry stream (a new identity's history) by stream-node-max-bytes.
        out["stream_prealloc"] = _stream_cost(rclient)

        # 4. Live codes in bulk as the service writes them (hash + tombstone record, the
        #    filler script), then the tombstone records of the codes that expired before
        #    them at the same steady issue rate: the bytes per live code, all counted.
        rclient.flushall()
        factory = CodeFactory(rclient)
        m3 = _used_memory(rclient)
        factory.fill(n_bulk, progress=lambda f: progress(0.75 + f / 8, "memory: bulk codes"))
        m4 = _used_memory(rclient)
        out["code_hash_bytes"] = (m4 - m3) / n_bulk
        sample = [k for _, k in zip(range(200), rclient.scan_iter(match="*:code:*"), strict=False)]
        usages = [int(rclient.memory_usage(k, samples=0) or 0) for k in sample]
        out["code_hash_memory_usage"] = sum(usages) / max(1, len(usages))
        records = factory.fill_expired(
            n_bulk, progress=lambda f: progress(0.875 + f / 8, "memory: expired codes' records")
        )
        m5 = _used_memory(rclient)
        out["expired_records"] = records
        out["tombstone_record_bytes"] = (m5 - m4) / max(1, records)
        out["per_live_code"] = (m5 - m3) / n_bulk
        tomb_keys = list(rclient.scan_iter(match="*:tomb:*", count=10_000))
        out["tombstone_strings"] = len(tomb_keys)
        # The service's own lookup finds the filler's records (same format).
        out["tombstone_lookup_check"] = await factory.check_expired(store, 50)
        rclient.flushall()
        out["code_hash_variants"] = _hash_variants(rclient, n=min(20_000, n_bulk))
        out["code_hash_variants_n"] = min(20_000, n_bulk)
        info = rclient.info("memory")
        out["allocator"] = info.get("mem_allocator")
        rclient.flushall()
    finally:
        await store.aclose()
        rclient.close()
    return out
