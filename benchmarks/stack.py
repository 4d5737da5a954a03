"""What the benchmarks run on: Redis and Mosquitto on free ports, service processes, codes.

Servers come from `tests/fixtures.py` (the same ones the test suite starts): harness-owned,
on free ports of 127.0.0.1, stopped at the end. Service instances run as subprocesses
(`python -m mqtt_pairing serve`), so the load generator never shares their event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.loadgen import Job
from mqtt_pairing.codes import code_fingerprint, format_code, generate_code
from mqtt_pairing.config import Settings
from mqtt_pairing.services.codes import PairingCodeService
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.store.redis_store import load_script_source
from tests.fixtures import MosquittoBroker, RedisServer, free_port, start_with_retries

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "benchmark-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
KEY_PREFIX = "pairing"
CODE_TTL_S = 600
TOMBSTONE_S = 3600
IDLE_TTL_S = 2_592_000

# Limits raised so that the load is never refused: the checks still run (the Lua scripts
# do the same work whatever the numbers), only the verdicts change.
BENCH_ENV = {
    "PAIRING_SECRET": SECRET,
    "PAIRING_KEY_PREFIX": KEY_PREFIX,
    "PAIRING_APP_REQUEST_LIMIT": "1000000000",
    "PAIRING_FAIL_LIMIT": "1000000000",
    "PAIRING_GLOBAL_FAIL_LIMIT": "1000000000",
    "PAIRING_RUNNER_CODE_LIMIT": "1000000000",
}

MOSQUITTO_EXTRA = "\n# benchmarks\npersistence false\nmax_queued_messages 100000\n"


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        raise SystemExit(f"bench: `{name}` not found (apt-get install -y redis-server mosquitto)")
    return path


def bench_settings(**overrides: Any) -> Settings:
    """Settings as the service subprocesses get them (for in-process parts)."""
    values: dict[str, Any] = {k.lower(): v for k, v in BENCH_ENV.items()}
    values.update(overrides)
    return Settings(**values)


@dataclass
class Servers:
    """Redis and Mosquitto owned by the harness."""

    workdir: Path
    redis: RedisServer = field(init=False)
    mosquitto: MosquittoBroker = field(init=False)

    def start(self) -> None:
        self.redis = start_with_retries(
            lambda: RedisServer(which("redis-server"), self.workdir / "redis")
        )
        self.mosquitto = start_with_retries(
            lambda: MosquittoBroker(
                which("mosquitto"), self.workdir / "mosquitto", extra_config=MOSQUITTO_EXTRA
            )
        )

    def stop(self) -> None:
        for server in ("mosquitto", "redis"):
            s = getattr(self, server, None)
            if s is not None:
                s.stop()

    def redis_client(self) -> redis.Redis:
        return redis.Redis(host=self.redis.host, port=self.redis.port, decode_responses=True)


class Process:
    """A subprocess with its output in a log file; `wait_for` scans the log."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        full_env = {**os.environ, **env}
        full_env.pop("CI", None)
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = "\n".join(self.log().splitlines()[-20:])
        self.stop()
        raise RuntimeError(f"{self.name}: no /{pattern}/ in its log:\n{tail}")

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        self._log.close()
        return self.proc.returncode


def start_service(
    name: str,
    workdir: Path,
    *,
    mqtt_url: str | None,
    redis_url: str | None,
    prefix: str,
    group: str = "bench",
    listen: str | None = None,
    log_level: str = "INFO",
    extra_env: dict[str, str] | None = None,
) -> Process:
    """`python -m mqtt_pairing serve` with the benchmark settings; returns once subscribed.

    With `mqtt_url` None it runs the embedded broker on `listen`, and with `redis_url`
    None the in-memory store (fakeredis).
    """
    env = {
        **BENCH_ENV,
        "PAIRING_TOPIC_PREFIX": prefix,
        "MQTT_CLIENT_ID": f"bench-{name}-{uuid.uuid4().hex[:6]}",
    }
    if mqtt_url:
        env["MQTT_URL"] = mqtt_url
        env["PAIRING_SHARED_GROUP"] = group
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra_env or {})
    health_port = free_port()
    env["PAIRING_HEALTH_LISTEN"] = f"127.0.0.1:{health_port}"
    argv = [sys.executable, "-m", "mqtt_pairing", "serve", "--log-level", log_level]
    if listen:
        argv += ["--listen", listen]
    proc = Process(name, argv, env, workdir)
    _wait_ready(proc, health_port)
    return proc


def _wait_ready(proc: Process, port: int, timeout_s: float = 30.0) -> None:
    """Poll `/readyz` (broker connected and subscribed, Redis answering)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            break
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1) as sock,
        ):
            sock.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            if sock.recv(64).startswith(b"HTTP/1.0 200"):
                return
        time.sleep(0.05)
    tail = "\n".join(proc.log().splitlines()[-20:])
    proc.stop()
    raise RuntimeError(f"{proc.name}: not ready after {timeout_s:.0f} s:\n{tail}")


def start_echo(
    workdir: Path, mqtt_url: str, prefix: str, *, max_inflight: int | None = None
) -> Process:
    argv = [sys.executable, "-m", "benchmarks.echo", "--url", mqtt_url, "--prefix", prefix]
    if max_inflight is not None:
        argv += ["--max-inflight", str(max_inflight)]
    proc = Process(f"echo-{prefix}", argv, {}, workdir)
    proc.wait_for(r"echo ready")
    return proc


def embedded_redis_url(proc: Process) -> str:
    """The REDIS_URL the embedded service printed for its in-memory store."""
    return proc.wait_for(r"REDIS_URL=(redis://\S+)").group(1)


FILLER_LUA = """
-- Writes ARGV[2] code hashes like issue_code.lua (same fields, same TTL), keys derived
-- from a counter: ARGV[1] key prefix, ARGV[2] count, ARGV[3] first index, ARGV[4] TTL ms,
-- ARGV[5] tombstone ms, ARGV[6] first char, ARGV[7] fingerprint, ARGV[8] salt.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
local first = tonumber(ARGV[3])
for i = first, first + tonumber(ARGV[2]) - 1 do
  local digest = string.sub(redis.sha1hex(ARGV[8] .. i), 1, 32)
  local key = ARGV[1] .. ':code:{code:' .. digest .. '}'
  redis.call('HSET', key, 'runner_id', 'filler-' .. i, 'state', 'active', 'max_uses', '1',
    'uses_left', '1', 'created_ms', now, 'expires_ms', now + ttl, 'first', ARGV[6],
    'fp', ARGV[7])
  redis.call('PEXPIRE', key, ttl + tonumber(ARGV[5]))
end
return 1
"""


class CodeFactory:
    """Issues codes straight into Redis, as the `code` op would, without MQTT.

    Real codes (`issue`): issue_code.lua + set_runner_code.lua, the service's own scripts,
    with digests from the service's own `PairingCodeService`, pipelined 1,000 at a time.
    Filler codes (`fill`): code hashes only, 10,000 per Lua call, for "1M live codes".
    """

    def __init__(self, client: redis.Redis, secret: str = SECRET) -> None:
        self.r = client
        self.keys = KeySchema(KEY_PREFIX)
        self.codes = PairingCodeService(None, bench_settings(), secret.encode())  # type: ignore[arg-type]
        self._issue = client.register_script(load_script_source("issue_code"))
        self._set_runner = client.register_script(load_script_source("set_runner_code"))
        self._fill = client.register_script(FILLER_LUA)
        self._filled = 0
        self._salt = uuid.uuid4().hex[:8]

    def issue(self, n: int, tag: str = "r") -> deque[Job]:
        """`n` live codes, each on its own new runner; the jobs that pair with them."""
        jobs: deque[Job] = deque()
        run = uuid.uuid4().hex[:6]
        for start in range(0, n, 1000):
            pipe = self.r.pipeline(transaction=False)
            now_ms = int(time.time() * 1000)
            for i in range(start, min(n, start + 1000)):
                runner = f"{tag}-{run}-{i}"
                code = generate_code()
                digest = self.codes.digest(code)
                self._issue(
                    keys=[self.keys.code(digest)],
                    args=[
                        runner,
                        1,
                        CODE_TTL_S * 1000,
                        TOMBSTONE_S * 1000,
                        code[0],
                        code_fingerprint(digest),
                    ],
                    client=pipe,
                )
                self._set_runner(
                    keys=[
                        self.keys.runner(runner),
                        self.keys.dedupe("runner", runner, "code", f"bench-{i}"),
                    ],
                    args=[
                        digest,
                        now_ms + CODE_TTL_S * 1000,
                        IDLE_TTL_S * 1000,
                        "sealed-reply-placeholder",
                        600_000,
                        "",
                        "",
                        "",
                    ],
                    client=pipe,
                )
                jobs.append(Job(runner, format_code(code)))
            pipe.execute()
        return jobs

    def wrong_guesses(self, n: int) -> deque[Job]:
        """`n` well-formed codes that were never issued (CODE_NOT_FOUND)."""
        return deque(Job(f"nobody-{i}", format_code(generate_code())) for i in range(n))

    def fill(self, n: int, progress: Any = None) -> None:
        """Add `n` filler code hashes (10,000 per Lua call)."""
        sample = self.codes.digest(generate_code())
        done = 0
        while done < n:
            batch = min(10_000, n - done)
            self._fill(
                args=[
                    KEY_PREFIX,
                    batch,
                    self._filled,
                    CODE_TTL_S * 1000,
                    TOMBSTONE_S * 1000,
                    "7",
                    code_fingerprint(sample),
                    self._salt,
                ]
            )
            self._filled += batch
            done += batch
            if progress is not None:
                progress(done / n)

    def live_code_keys(self) -> int:
        """Code hashes in Redis (SCAN; slow on millions, so call it on small sets only)."""
        return sum(1 for _ in self.r.scan_iter(match=f"{KEY_PREFIX}:code:*", count=10_000))


def redis_info(client: redis.Redis, section: str) -> dict[str, Any]:
    return dict(client.info(section))


def commandstats(client: redis.Redis) -> dict[str, int]:
    """Calls by command (`INFO commandstats`), commands run inside scripts included."""
    out: dict[str, int] = {}
    for key, value in client.info("commandstats").items():
        name = key.removeprefix("cmdstat_")
        out[name] = int(value["calls"])
    return out


def commandstats_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0) > 0}


def free_listen() -> str:
    return f"127.0.0.1:{free_port()}"
