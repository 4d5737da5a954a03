"""Helpers of the race tests: request workers in separate OS processes, started together.

`run_workers(redis_url, key_prefix, jobs)` starts one `tests.races.worker` process per job,
waits until each has connected (its `ready` line), releases them all at once (one token
each on a Redis list they BLPOP) and returns every reply, per worker, in request order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mqtt_pairing.store import connect_redis
from tests.harness.serve import clean_env
from tests.harness.servers import REPO_ROOT
from tests.harness.waiting import wait_redis_time

WORKER_START_TIMEOUT_S = 60.0
WORKER_RUN_TIMEOUT_S = 60.0

RACE_SETTINGS: dict[str, Any] = {
    # Limits out of the way: the races are about codes, not about rates.
    "pairing_global_fail_limit": 100_000,
    "pairing_app_request_limit": 100_000,
    "pairing_runner_code_limit": 100_000,
    "pairing_fail_limit": 100_000,
    "pairing_max_sessions_per_runner": 100,
    "pairing_code_ttl_min_s": 1,
    "pairing_code_max_uses_max": 100,
}
"""Settings of the test's Dispatcher and of every worker's."""


@dataclass
class Outcome:
    """One request a worker made, and how it ended."""

    worker: int
    request: dict[str, Any]
    reply: dict[str, Any]
    start_ms: int
    """Redis time just before the request was handled."""
    done_ms: int
    """Redis time just after the reply."""

    @property
    def ok(self) -> bool:
        return bool(self.reply.get("ok"))

    @property
    def code(self) -> str:
        """ "ok" or the reply's error code."""
        return "ok" if self.ok else str(self.reply["error"]["code"])


def request(kind: str, ident: str, op: str, delay_ms: int = 0, **body: Any) -> dict[str, Any]:
    """One request of a job (a fresh request_id unless `body` has one)."""
    body.setdefault("request_id", uuid.uuid4().hex)
    return {"kind": kind, "id": ident, "op": op, "body": body, "delay_ms": delay_ms}


Prepare = Callable[[], Awaitable[tuple[list[list[dict[str, Any]]], int | None]]]
"""Called once the workers are ready: (one job per worker, Redis time to release them at
or None for at once)."""


async def run_workers(
    redis_url: str,
    key_prefix: str,
    jobs: list[list[dict[str, Any]]] | Prepare,
    tmp_path: Path,
    *,
    workers: int | None = None,
    cluster: bool = False,
    settings: dict[str, Any] | None = None,
) -> list[list[Outcome]]:
    """Run each job's requests in a worker process of its own, all released at once.

    `jobs`: one list of requests per worker, or a `Prepare` called once the workers are
    ready (with `workers` saying how many), for jobs that must be made at the last moment
    (codes with a short TTL) or released at a given Redis time.
    """
    count = workers if workers is not None else len(jobs)  # type: ignore[arg-type]
    go_key = f"{key_prefix}:race-go:{uuid.uuid4().hex}"
    config = {
        "redis_url": redis_url,
        "cluster": cluster,
        "key_prefix": key_prefix,
        "settings": {**RACE_SETTINGS, **(settings or {})},
        "go_key": go_key,
    }
    run = uuid.uuid4().hex[:6]
    config_file = tmp_path / f"race-{run}-config.json"
    config_file.write_text(json.dumps(config))
    job_files = [tmp_path / f"race-{run}-job-{n}.json" for n in range(count)]
    logs = [tmp_path / f"race-{run}-worker-{n}.log" for n in range(count)]
    processes: list[asyncio.subprocess.Process] = []
    try:
        for n in range(count):
            with logs[n].open("wb") as sink:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "tests.races.worker",
                        str(config_file),
                        str(job_files[n]),
                        cwd=REPO_ROOT,
                        env=clean_env(),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=sink,
                    )
                )
        for n, process in enumerate(processes):
            assert process.stdout is not None
            try:
                line = await asyncio.wait_for(process.stdout.readline(), WORKER_START_TIMEOUT_S)
            except TimeoutError:
                pytest.fail(f"worker {n} not ready after {WORKER_START_TIMEOUT_S} s")
            if line.strip() != b"ready":
                pytest.fail(f"worker {n} did not start: {logs[n].read_text(errors='replace')}")
        release_at_ms: int | None = None
        if callable(jobs):
            jobs, release_at_ms = await jobs()
        assert len(jobs) == count
        for n, requests in enumerate(jobs):
            job_files[n].write_text(json.dumps(requests))
        go = connect_redis(redis_url, timeout_s=10.0, cluster=cluster)
        try:
            if release_at_ms is not None:
                await wait_redis_time(go, release_at_ms, "the release time")
            await go.rpush(go_key, *(["go"] * count))
        finally:
            await go.aclose()
        out: list[list[Outcome]] = []
        for n, process in enumerate(processes):
            try:
                stdout, _ = await asyncio.wait_for(process.communicate(), WORKER_RUN_TIMEOUT_S)
            except TimeoutError:
                pytest.fail(f"worker {n} still running after {WORKER_RUN_TIMEOUT_S} s")
            if process.returncode != 0:
                tail = "\n".join(logs[n].read_text(errors="replace").splitlines()[-30:])
                pytest.fail(f"worker {n} exited {process.returncode}:\n{tail}")
            lines = [json.loads(x) for x in stdout.decode().splitlines() if x.strip()]
            by_index = {line["i"]: line for line in lines}
            assert sorted(by_index) == list(range(len(jobs[n]))), (n, lines)
            out.append(
                [
                    Outcome(
                        n,
                        jobs[n][i],
                        by_index[i]["reply"],
                        by_index[i]["start_ms"],
                        by_index[i]["done_ms"],
                    )
                    for i in range(len(jobs[n]))
                ]
            )
        return out
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
