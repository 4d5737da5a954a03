"""What the benchmarks run on: Redis and Mosquitto on free ports, service processes, codes.

Servers come from `tests/harness/servers.py` (the same ones the test suite starts): harness-owned,
on free ports of 127.0.0.1, stopped at the end; the Redis Cluster too (`redis_cluster`:
`RedisClusterServers` with 3 masters and no replicas, formed by `redis-cli --cluster
create`). Service instances run as subprocesses (`python -m mqtt_pairing serve`), so the
load generator never shares their event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from typing import Any, Protocol

import redis

from benchmarks.loadgen import Job
from mqtt_pairing.codes import format_code, generate_code
from mqtt_pairing.config import Settings
from mqtt_pairing.services.codes import PairingCodeService
from mqtt_pairing.store.keys import KeySchema
from mqtt_pairing.store.redis_store import load_prelude_source, load_script_source
from tests.harness.servers import (
    MosquittoBroker,
    RedisClusterServers,
    RedisServer,
    free_port,
    start_with_retries,
)

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

# The Redis Cluster step: 3 masters, no replicas (no failover is measured), and the global
# keys spread over 2 shards per master (docs/scaling.md: "2 to 4 shards per master").
CLUSTER_MASTERS = 3
CLUSTER_SHARDS = 6
# Production's default node timeout: on a loaded machine a short one can mark a busy
# master as failing in the middle of a run.
CLUSTER_NODE_TIMEOUT_MS = 15_000


class Stoppable(Protocol):
    """Anything the harness starts and must stop: a `Process`, a `RedisClusterServers`."""

    def stop(self) -> Any: ...


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
        self.health_port: int | None = None
        self._terminated = False
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

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; `stop` then waits for it."""
        if self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.terminate()
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
    None (and no `REDIS_CLUSTER_URL` in `extra_env`) the in-memory store (fakeredis).
    """
    proc = launch_service(
        name, workdir, mqtt_url=mqtt_url, redis_url=redis_url, prefix=prefix, group=group,
        listen=listen, log_level=log_level, extra_env=extra_env,
    )  # fmt: skip
    wait_ready(proc)
    return proc


def launch_service(
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
    """Like `start_service`, without waiting: several instances can start side by side.

    Call `wait_ready` on each (it stops the process if it never gets ready).
    """
    env = {
        **BENCH_ENV,
        "PAIRING_TOPIC_PREFIX": prefix,
        "MQTT_CLIENT_ID": f"bench-{name}:{uuid.uuid4().hex[:6]}",
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
    proc.health_port = health_port
    return proc


def wait_ready(proc: Process, timeout_s: float = 60.0) -> None:
    """Poll `/readyz` (broker connected and subscribed, Redis answering)."""
    port = proc.health_port
    assert port is not None, "wait_ready needs a process from launch_service"
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


def redis_cluster(workdir: Path, masters: int = CLUSTER_MASTERS) -> RedisClusterServers:
    """A Redis Cluster of `masters` masters without replicas, not started yet.

    `start()` starts the nodes on free ports (bus: port + 10000), runs `redis-cli
    --cluster create ... --cluster-replicas 0 --cluster-yes` and waits until every node
    says `cluster_state:ok`; `stop()` stops every node. The caller registers it for
    stopping before starting it, so that an interrupted start leaks no node.
    """
    return RedisClusterServers(
        which("redis-server"),
        which("redis-cli"),
        workdir / f"redis-cluster-{uuid.uuid4().hex[:4]}",
        masters=masters,
        replicas=0,
        node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS,
    )


def cluster_env(cluster: RedisClusterServers, shards: int = CLUSTER_SHARDS) -> dict[str, str]:
    """The settings of a service instance on the cluster (`REDIS_CLUSTER_URL`, shards)."""
    return {
        "REDIS_CLUSTER_URL": cluster.url,
        "PAIRING_INDEX_SHARDS": str(shards),
        "PAIRING_GLOBAL_FAIL_SHARDS": str(shards),
    }


def embedded_redis_url(proc: Process) -> str:
    """The REDIS_URL the embedded service printed for its in-memory store."""
    return proc.wait_for(r"REDIS_URL=(redis://\S+)").group(1)


FILLER_LUA = """
-- Bulk codes for the memory and live-code steps, written as the service writes them.
-- ARGV[1] key prefix, ARGV[2] count, ARGV[3] first index, ARGV[4] code TTL ms,
-- ARGV[5] tombstone ms, ARGV[6] first char, ARGV[7] (unused), ARGV[8] salt,
-- ARGV[9] mode: 'live' (code hashes like issue_code.lua, expiring evenly over the next
-- TTL, each with its tombstone record like add_tombstone.lua) or 'expired' (only the
-- records of codes issued at the same steady rate that expired before now and are still
-- kept: mqtt_pairing/tombstones.py), the ARGV[3]-th to at most the (ARGV[3] + ARGV[10])-th
-- before ARGV[11] (ms, Redis time read once), for ARGV[2] live codes' issue rate.
-- Returns the number of records written.
local now = now_ms()
if ARGV[9] == 'expired' then now = tonumber(ARGV[11]) end
local ttl = tonumber(ARGV[4])
local tomb = tonumber(ARGV[5])
local count = tonumber(ARGV[2])
local first = tonumber(ARGV[3])
local w = math.max(1, math.ceil(tomb / 6))
local step = ttl / count  -- ms between two expiries at the steady issue rate
local pending, order = {}, {}
local function record(digest, e)
  local window = math.floor(e / w)
  local off = math.floor((e - window * w) * 256 / w)
  local bucket = math.floor(tonumber(string.sub(digest, 3, 3), 16) / 4)
  local key = ARGV[1] .. ':tomb:{c:' .. string.sub(digest, 1, 2) .. '}:' .. window .. ':'
    .. bucket
  if not pending[key] then
    pending[key] = {parts = {}, at = (window + 1) * w + tomb + 1000}
    order[#order + 1] = key
  end
  local parts = pending[key].parts
  parts[#parts + 1] = unhex(string.sub(digest, 3, 12)) .. string.char(off)
end
-- As add_tombstone.lua leaves them: each string at its exact size (SET, not APPEND); the
-- records of one call are added with one SET per string.
local function flush()
  for _, key in ipairs(order) do
    local p = pending[key]
    local s = redis.call('GET', key) or ''
    redis.call('SET', key, s .. table.concat(p.parts), 'PXAT', p.at)
  end
end
local written = 0
if ARGV[9] == 'live' then
  for i = first, first + count - 1 do
    local digest = string.sub(redis.sha1hex(ARGV[8] .. i), 1, 24)
    local key = ARGV[1] .. ':code:{c:' .. string.sub(digest, 1, 2) .. '}:' .. digest
    local e = math.floor(now + step * (i - first + 1))
    redis.call('HSET', key, 'r', 'filler-' .. i, 's', 'active', 'm', '1', 'u', '1',
      'c', e - ttl, 'e', e, 'f', ARGV[6])
    redis.call('PEXPIREAT', key, e)
    if tomb > 0 then record(digest, e) end
    written = written + 1
  end
elseif tomb > 0 then
  local i = first
  local e = now - step * (i + 1)
  while written < tonumber(ARGV[10]) and math.floor(e / w) * w + w + tomb + 1000 > now do
    record(string.sub(redis.sha1hex(ARGV[8] .. 'x' .. i), 1, 24), math.floor(e))
    written = written + 1
    i = i + 1
    e = now - step * (i + 1)
  end
end
flush()
return written
"""


def _evalsha(pipe: Any, sha: str, keys: list[str], args: list[Any]) -> None:
    """Queue EVALSHA (the script is loaded beforehand) on a plain pipeline."""
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)


class _Pipelines:
    """One plain pipeline, or on a cluster one per master, picked by the key's slot.

    redis-py's cluster pipeline refuses `evalsha` and, given EVALSHA as a raw command,
    asks the server for its keys (COMMAND GETKEYS) once per command: ten times slower than
    routing by `keyslot` here, from the client's slot table.
    """

    def __init__(self, client: redis.Redis | redis.RedisCluster) -> None:
        self.client = client
        self.pipes: dict[str, Any] = {}

    def of(self, key: str) -> Any:
        if not isinstance(self.client, redis.RedisCluster):
            name = ""
            if name not in self.pipes:
                self.pipes[name] = self.client.pipeline(transaction=False)
            return self.pipes[name]
        node = self.client.get_node_from_key(key)  # type: ignore[no-untyped-call]
        if node.name not in self.pipes:
            self.pipes[node.name] = node.redis_connection.pipeline(transaction=False)
        return self.pipes[node.name]

    def execute(self) -> None:
        for pipe in self.pipes.values():
            pipe.execute()


class CodeFactory:
    """Issues codes straight into Redis, as the `code` op would, without MQTT.

    Real codes (`issue`): issue_code.lua + set_runner_code.lua, the service's own scripts,
    with digests from the service's own `PairingCodeService`, pipelined 1,000 at a time.
    Filler codes (`fill`): code hashes only, 10,000 per Lua call, for "1M live codes".
    On a `RedisCluster` client `issue` works too (each script keeps to one hash tag, and
    the cluster pipeline sends each EVALSHA to the master of its slot); `fill` does not.
    """

    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        secret: str = SECRET,
        key_prefix: str = KEY_PREFIX,
    ) -> None:
        self.r = client
        self.keys = KeySchema(key_prefix)
        self.codes = PairingCodeService(None, bench_settings(), secret.encode())  # type: ignore[arg-type]
        self.layout = bench_settings().tombstones
        self._issue = client.register_script(load_script_source("issue_code"))
        self._tomb = client.register_script(load_script_source("add_tombstone"))
        self._set_runner = client.register_script(load_script_source("set_runner_code"))
        self._fill = client.register_script(load_prelude_source() + FILLER_LUA)
        # Loaded up front (SCRIPT LOAD goes to every master of a cluster): `issue` sends
        # EVALSHA as a raw command on plain pipelines (see `_Pipelines`).
        for script in (self._issue, self._set_runner, self._tomb):
            client.script_load(script.script)
        self._filled = 0
        self._salt = uuid.uuid4().hex[:8]

    def issue(self, n: int, tag: str = "r", max_uses: int = 1) -> deque[Job]:
        """`n` live codes, each on its own new runner; the jobs that pair with them.

        With `max_uses` > 1 each code allows that many pairs, and its job comes that many
        times in a row (one per use: the load generator sends them from different apps).
        """
        jobs: deque[Job] = deque()
        run = uuid.uuid4().hex[:6]
        for start in range(0, n, 1000):
            pipes = _Pipelines(self.r)
            now_ms = int(time.time() * 1000)
            for i in range(start, min(n, start + 1000)):
                runner = f"{tag}-{run}-{i}"
                code = generate_code()
                digest = self.codes.digest(code)
                code_key = self.keys.code(digest)
                _evalsha(
                    pipes.of(code_key),
                    self._issue.sha,
                    [code_key],
                    [
                        runner,
                        max_uses,
                        CODE_TTL_S * 1000,
                        code[0],
                    ],
                )
                # its tombstone record, as PairingCodeService.issue writes it
                place = self.layout.place(digest, now_ms + CODE_TTL_S * 1000)
                tomb_key = self.keys.tombstones(place.group, place.window, place.bucket)
                _evalsha(
                    pipes.of(tomb_key),
                    self._tomb.sha,
                    [tomb_key],
                    [place.fingerprint, place.offset, place.expire_at_ms],
                )
                _evalsha(
                    pipes.of(self.keys.runner(runner)),
                    self._set_runner.sha,
                    [
                        self.keys.runner(runner),
                        self.keys.dedupe("runner", runner, "code", f"bench-{i}"),
                    ],
                    [
                        digest,
                        now_ms + CODE_TTL_S * 1000,
                        IDLE_TTL_S * 1000,
                        "sealed-reply-placeholder",
                        600_000,
                        "",
                        "",
                        "",
                        max_uses,
                    ],
                )
                for _ in range(max_uses):
                    jobs.append(Job(runner, format_code(code)))
            pipes.execute()
        return jobs

    def wrong_guesses(self, n: int) -> deque[Job]:
        """`n` well-formed codes that were never issued (CODE_NOT_FOUND)."""
        return deque(Job(f"nobody-{i}", format_code(generate_code())) for i in range(n))

    def fill(self, n: int, progress: Any = None) -> None:
        """Add `n` filler live codes: hashes and their tombstone records (10,000 per call).

        Their expiries spread evenly over the next TTL, as at a steady issue rate.
        """
        done = 0
        while done < n:
            batch = min(10_000, n - done)
            self._fill(args=[*self._fill_args(batch, self._filled), "live", 0, 0])
            self._filled += batch
            done += batch
            if progress is not None:
                progress(done / n)

    def fill_expired(self, n_live: int, progress: Any = None) -> int:
        """Add the tombstone records that `n_live` live codes have behind them.

        At a steady issue rate of `n_live` per TTL: the records of the codes that
        expired before now and whose strings are still kept (about TTL + tombstone +
        half a window / TTL of them per live code, less the live one's own). Returns
        the number written.
        """
        secs, micros = self.r.time()  # type: ignore[misc]
        anchor = int(secs) * 1000 + int(micros) // 1000
        expected = n_live * (TOMBSTONE_S + 600) / CODE_TTL_S
        written = 0
        while True:
            got = int(
                self._fill(args=[*self._fill_args(n_live, written), "expired", 50_000, anchor])  # type: ignore[arg-type]
            )
            written += got
            if progress is not None:
                progress(min(1.0, written / expected))
            if got < 50_000:
                return written

    async def check_expired(self, store: Any, n: int) -> str:
        """Whether the service's `find_tombstone` finds the first `n` `fill_expired`
        records (and not codes that never were): "ok", or what went wrong."""
        now = int(time.time() * 1000)
        for i in range(n):
            digest = hashlib.sha1(f"{self._salt}x{i}".encode()).hexdigest()[:24]
            if not await store.find_tombstone(self.layout, digest, now):
                return f"record {i} not found"
        for i in range(n):
            digest = hashlib.sha1(f"{self._salt}never{i}".encode()).hexdigest()[:24]
            if await store.find_tombstone(self.layout, digest, now):
                return f"a code that never was answers CODE_EXPIRED ({i})"
        return "ok"

    def _fill_args(self, count: int, first: int) -> list[Any]:
        return [
            KEY_PREFIX,
            count,
            first,
            CODE_TTL_S * 1000,
            TOMBSTONE_S * 1000,
            "7",
            0,
            self._salt,
        ]

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


def scrape_metrics(port: int, timeout_s: float = 2.0) -> dict[str, float]:
    """A service's `/metrics` (its health port) as {sample with labels: value}."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    body = b"".join(chunks).split(b"\r\n\r\n", 1)[-1].decode(errors="replace")
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metric_sum(samples: dict[str, float], metric: str, **labels: str) -> float:
    """Sum of the samples of `metric` whose labels include `labels` (instance ignored)."""
    total = 0.0
    for sample, value in samples.items():
        base, _, rest = sample.partition("{")
        if base != metric:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def free_listen() -> str:
    return f"127.0.0.1:{free_port()}"
