"""Servers for tests: real redis-server and mosquitto subprocesses, and fakeredis over TCP.

Every server here binds 127.0.0.1 on a free port (never the machine's 6379 or 1883), keeps
its files in its own temporary directory and is stopped by the fixture that started it.
`RedisClusterServers` runs a Redis Cluster of such servers (3 masters, 3 replicas), and
`StoreBackend` names the engine a store test runs on (real Redis, fakeredis or the cluster).
The fixtures live in `tests/harness/fixtures.py`; benchmarks import this module too.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import fakeredis
import paho.mqtt.client as mqtt
import pytest
import redis
import redis.asyncio as aioredis
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from redis.cluster import ClusterNode

from mqtt_pairing.broker import without_nagle
from mqtt_pairing.store import connect_redis

REPO_ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO_TEST_CONF = REPO_ROOT / "broker-config" / "mosquitto-test.conf"

LOOPBACK = "127.0.0.1"
# Redis Cluster uses port + 10000 for its bus, so every port handed out stays below this.
MAX_PORT = 55536
# Never hand out the ports of services that may already run on the machine.
_RESERVED_PORTS = frozenset({1883, 1884, 1885, 6379, 8083, 8883})

# Set by .ci/run: servers record their PIDs there so that a killed pytest leaks none.
PIDDIR_ENV = "MQTT_PAIRING_TEST_PIDDIR"

START_TIMEOUT_S = 15.0
CLUSTER_SLOTS = 16384
STOP_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
# Directories searched after PATH: Debian installs mosquitto in /usr/sbin, which is not on
# every user's PATH.
_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")

_APT_HINT = "apt-get install -y redis-server mosquitto mosquitto-clients"


def require_binary(name: str) -> str:
    """Return the path of an executable, or fail (CI) / skip (elsewhere) the test.

    With `CI=true` a missing server binary is an error: the suite must not pass by skipping
    what it was meant to test.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is not None:
        return path
    reason = f"`{name}` not found on PATH or in {', '.join(_SBIN_DIRS)} (install: {_APT_HINT})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(reason)  # never under CI=true: failed above


def free_port(host: str = LOOPBACK, *, with_cluster_bus: bool = False) -> int:
    """Return a TCP port that was free on `host` a moment ago, below `MAX_PORT`.

    No port is handed out twice in one test session. With `with_cluster_bus`, port + 10000
    (the Redis Cluster bus) was free too.
    """
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port >= MAX_PORT or port in _RESERVED_PORTS or port in _handed_out:
            continue
        if with_cluster_bus and not _bindable(host, port + 10000):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port below {MAX_PORT} found")


_handed_out: set[int] = set()


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_is_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Say whether a TCP connection to (host, port) succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class _ServerProcess:
    """A server subprocess with a log file, restartable on the same port."""

    name = "server"

    def __init__(self, binary: str, host: str, port: int, directory: Path) -> None:
        self.binary = binary
        self.host = host
        self.port = port
        self.directory = directory
        self.log_path = directory / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    # -- to override ---------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the server (no-op if running) and wait until it answers."""
        if self.running:
            return
        if port_is_open(self.host, self.port):
            # Someone else holds the port: waiting for "ready" would talk to them.
            raise RuntimeError(f"{self.name}: port {self.host}:{self.port} is already in use")
        self._close_log()
        self._log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            start_new_session=True,  # a Ctrl-C in pytest must not reach it first
        )
        self._record_pid()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                self._reap()
                raise RuntimeError(
                    f"{self.name} on port {self.port} exited with {code} while starting:\n"
                    f"{_tail(self.log_path)}"
                )
            if self.is_ready():
                return
            time.sleep(_POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(
            f"{self.name} on port {self.port} not ready after {timeout_s:.0f} s:\n"
            f"{_tail(self.log_path)}"
        )

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop gracefully (SIGTERM), killing after `timeout_s`. Idempotent."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        self._reap()

    def kill(self) -> None:
        """Kill at once (SIGKILL): a crash, nothing is saved on the way out."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)
        self._reap()

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop gracefully and start again on the same port with the same files."""
        self.stop()
        self._wait_port_released()
        self.start(timeout_s=timeout_s)

    def _wait_port_released(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while port_is_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_S)

    def _reap(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self.process is not None and self.process.returncode is not None:
            self._pid_file(self.process.pid).unlink(missing_ok=True)
        self._close_log()

    def _pid_file(self, pid: int) -> Path:
        return Path(os.environ.get(PIDDIR_ENV) or self.directory) / f"{self.name}-{pid}.pid"

    def _record_pid(self) -> None:
        """Leave "PID START_TIME" where `.ci/run` looks for servers a killed pytest left behind.

        The start time (field 22 of /proc/PID/stat) guards against a reused PID.
        """
        if self.process is None or not os.environ.get(PIDDIR_ENV):
            return
        pid = self.process.pid
        try:
            start_time = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            start_time = "?"
        self._pid_file(pid).write_text(f"{pid} {start_time}\n")

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"


class RedisServer(_ServerProcess):
    """A real `redis-server`, no persistence, in its own directory.

    Attributes: `host`, `port`, `url` (`redis://127.0.0.1:PORT/0`), `process`, `directory`,
    `log_path`; `start()`, `stop()`, `kill()`, `restart()` keep the port.
    """

    name = "redis-server"

    def __init__(
        self,
        binary: str,
        directory: Path,
        host: str = LOOPBACK,
        port: int | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        super().__init__(binary, host, port or free_port(host), directory)
        self.extra_args = list(extra_args or [])

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            *self.extra_args,
        ]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync redis-py client for this server; the caller closes it."""
        kwargs.setdefault("socket_timeout", 5)
        return redis.Redis(host=self.host, port=self.port, **kwargs)

    def is_ready(self) -> bool:
        try:
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def flushall(self) -> None:
        with self.client() as client:
            client.flushall()


class MosquittoBroker(_ServerProcess):
    """A real `mosquitto` with a config rendered from `broker-config/mosquitto-test.conf`.

    Attributes: `host`, `port`, `url` (`mqtt://127.0.0.1:PORT`), `config_path`,
    `persistence_dir`, `log_path`, `process`; `start()`, `stop()` (graceful: the session
    database is saved), `kill()` (crash), `restart()` keep the port and the persistence dir.
    """

    name = "mosquitto"

    def __init__(
        self,
        binary: str,
        directory: Path,
        host: str = LOOPBACK,
        port: int | None = None,
        template: Path = MOSQUITTO_TEST_CONF,
        extra_config: str = "",
    ) -> None:
        super().__init__(binary, host, port or free_port(host), directory)
        self.persistence_dir = directory / "data"
        self.persistence_dir.mkdir(exist_ok=True)
        self.config_path = directory / "mosquitto.conf"
        self.config_path.write_text(
            render_mosquitto_config(
                template,
                host=self.host,
                port=self.port,
                data_dir=self.persistence_dir,
                log_file=self.log_path,
            )
            + extra_config
        )

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        return port_is_open(self.host, self.port) and mqtt_can_connect(self.host, self.port)


def render_mosquitto_config(
    template: Path, *, host: str, port: int, data_dir: Path, log_file: Path
) -> str:
    """Fill the `{{...}}` placeholders of a mosquitto config template."""
    text = template.read_text()
    values = {
        "{{HOST}}": host,
        "{{PORT}}": str(port),
        "{{DATA_DIR}}": str(data_dir),
        "{{LOG_FILE}}": str(log_file),
        "{{USER}}": getpass.getuser(),
    }
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    if "{{" in text:
        raise ValueError(f"unknown placeholder left in {template}")
    return text


def mqtt_can_connect(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Say whether an MQTT 3.1.1 CONNECT to (host, port) is accepted (paho, no thread)."""
    accepted: list[bool] = []

    def on_connect(
        _client: mqtt.Client,
        _userdata: object,
        _flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        _properties: Properties | None,
    ) -> None:
        accepted.append(not reason_code.is_failure)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"probe-{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv311,
    )
    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
        deadline = time.monotonic() + timeout_s
        while not accepted and time.monotonic() < deadline:
            if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS:
                break
        return bool(accepted and accepted[0])
    except OSError:
        return False
    finally:
        if client.is_connected():
            client.disconnect()
        # paho closes its socket on disconnect or error; make sure it is gone either way.
        sock = client.socket()
        if sock is not None:
            sock.close()


class FakeRedisServer:
    """fakeredis served over TCP (`fakeredis.TcpFakeServer`) from a thread.

    Attributes: `host`, `port`, `url`, `server` (the `TcpFakeServer`); `start()`, `stop()`.
    It runs Lua with lupa, not Redis's Lua 5.1, and has no INFO.
    """

    def __init__(self, host: str = LOOPBACK, port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.server: fakeredis.TcpFakeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        if self.running:
            return
        self.server = fakeredis.TcpFakeServer((self.host, self.port), server_type="redis")
        without_nagle(self.server)
        self._thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeredis-{self.port}",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with redis.Redis(host=self.host, port=self.port, socket_timeout=1) as client:
                    if client.ping():
                        return
            except redis.RedisError:
                time.sleep(_POLL_INTERVAL_S)
        self.stop()
        raise RuntimeError(f"fakeredis on port {self.port} not ready after {timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop serving, close the listening socket and join the connection threads."""
        if self.server is None:
            return
        # shutdown() sets the flag the connection handlers poll, then stops serve_forever;
        # server_close() joins the (non-daemon) handler threads.
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)
        self.server = None
        self._thread = None

    def flushall(self) -> None:
        with redis.Redis(host=self.host, port=self.port, socket_timeout=5) as client:
            client.flushall()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<FakeRedisServer {self.host}:{self.port} {state}>"


class _Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


ServerT = TypeVar("ServerT", bound=_Startable)


def start_with_retries(factory: Callable[[], ServerT], attempts: int = 3) -> ServerT:
    """Create and start a server, picking a new free port if the first one got taken."""
    last_error: RuntimeError | None = None
    for _ in range(attempts):
        server = factory()
        try:
            server.start()
        except RuntimeError as error:
            server.stop()
            last_error = error
            continue
        return server
    assert last_error is not None
    raise last_error


class RedisClusterNode(RedisServer):
    """One `redis-server --cluster-enabled yes` node; its `nodes-PORT.conf` survives restarts.

    Restarted (same port, same directory) after a kill, it rejoins the cluster with the
    identity in its nodes file; with no persistence its data is gone, so it comes back as
    a replica of whichever node took over its slots and syncs from it.
    """

    name = "redis-cluster-node"

    def __init__(
        self,
        binary: str,
        directory: Path,
        *,
        port: int,
        node_timeout_ms: int,
        host: str = LOOPBACK,
    ) -> None:
        super().__init__(
            binary,
            directory,
            host=host,
            port=port,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                # A dead master stops only its own slots, not the whole cluster.
                "--cluster-require-full-coverage",
                "no",
                # Replicas sync at once (the diskless sync waits 5 s for more replicas).
                "--repl-diskless-sync-delay",
                "0",
            ],
        )

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def info(self, section: str) -> dict[str, str]:
        """`INFO section` (or `CLUSTER INFO` for "cluster") as a dict of strings."""
        with self.client(socket_timeout=2, socket_connect_timeout=2) as client:
            if section == "cluster":
                raw = client.execute_command("CLUSTER", "INFO")
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
                return {k.strip(): v.strip() for k, v in pairs}
            return {str(k): str(v) for k, v in client.info(section).items()}

    def role(self) -> str:
        """ "master" or "slave", as this node sees itself."""
        return self.info("replication")["role"]


class RedisClusterServers:
    """A Redis Cluster of real `redis-server` nodes: `masters` masters with `replicas` each.

    Nodes bind 127.0.0.1 on free ports below 55536 (the bus is port + 10000), keep their
    files in their own directories and persist nothing. `start()` forms the cluster with
    `redis-cli --cluster create` and waits until every node says `cluster_state:ok`, every
    node agrees on the slots and every replica is in sync.

    Attributes: `nodes` (every `RedisClusterNode`), `url` (a live master's URL: any node
    will do for `RedisCluster`), `urls`; `masters()`, `replicas()`, `node_of_slot(slot)`,
    `kill(node)`, `revive()` (restart killed nodes and wait for a healthy cluster),
    `wait_healthy()`, `wait_failover(old_master)`, `flushall()`, `client()` (sync
    RedisCluster, for checks).
    """

    def __init__(
        self,
        server_binary: str,
        cli_binary: str,
        directory: Path,
        *,
        masters: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 2000,
    ) -> None:
        self.cli_binary = cli_binary
        self.directory = directory
        self.masters_count = masters
        self.replicas_per_master = replicas
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[RedisClusterNode] = []
        self._formed = False
        for _ in range(masters * (1 + replicas)):
            port = free_port(LOOPBACK, with_cluster_bus=True)
            self.nodes.append(
                RedisClusterNode(
                    server_binary,
                    directory / f"node-{port}",
                    port=port,
                    node_timeout_ms=node_timeout_ms,
                )
            )

    # -- lifecycle -----------------------------------------------------------------
    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every node, form the cluster and wait until it is healthy.

        Once formed, `start()` is `revive()`: killed nodes rejoin with their nodes files.
        """
        if self._formed:
            self.revive(timeout_s)
            return
        for node in self.nodes:
            node.start()
        command = [
            self.cli_binary,
            "--cluster",
            "create",
            *(node.address for node in self.nodes),
            "--cluster-replicas",
            str(self.replicas_per_master),
            "--cluster-yes",
        ]
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            self.stop()
            output = (done.stdout + done.stderr).decode(errors="replace")
            raise RuntimeError(f"redis-cli --cluster create failed:\n{output[-2000:]}")
        self._formed = True
        self.wait_healthy(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, node: RedisClusterNode) -> None:
        """SIGKILL one node: a crash, nothing saved."""
        node.kill()

    def set_node_timeout(self, node_timeout_ms: int | None = None) -> None:
        """`CONFIG SET cluster-node-timeout` on every running node (None: the start value).

        How long a dead master goes unnoticed, hence how long a failover takes (about the
        timeout plus a second or two); production clusters default to 15 s.
        """
        value = self.node_timeout_ms if node_timeout_ms is None else node_timeout_ms
        for node in self.nodes:
            if node.running:
                with node.client() as client:
                    client.config_set("cluster-node-timeout", value)

    def revive(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Restart every stopped node (same port and nodes file) and wait until healthy."""
        for node in self.nodes:
            if not node.running:
                node._wait_port_released()
                node.start()
        self.wait_healthy(timeout_s)

    # -- state ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.masters()[0].url

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes if node.running]

    def _cluster_nodes(self, node: RedisClusterNode) -> list[dict[str, Any]]:
        """`CLUSTER NODES` as seen by `node`: id, address, flags, master id, slots."""
        with node.client(socket_timeout=2, socket_connect_timeout=2) as client:
            raw = client.execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        out: list[dict[str, Any]] = []
        for line in text.splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            out.append(
                {
                    "id": parts[0],
                    "address": parts[1].split("@", 1)[0],
                    "flags": set(parts[2].split(",")),
                    "master": parts[3],
                    "link": parts[7],
                    "slots": parts[8:],
                }
            )
        return out

    def _live_view(self) -> list[dict[str, Any]]:
        for node in self.nodes:
            if node.running:
                with contextlib.suppress(redis.RedisError):
                    return self._cluster_nodes(node)
        raise RuntimeError("no cluster node answers")

    def _by_address(self, address: str) -> RedisClusterNode:
        for node in self.nodes:
            if node.address == address:
                return node
        raise KeyError(address)

    def masters(self) -> list[RedisClusterNode]:
        """Running masters that hold slots, as the cluster sees them (port order)."""
        found = [
            self._by_address(entry["address"])
            for entry in self._live_view()
            if "master" in entry["flags"] and "fail" not in entry["flags"] and entry["slots"]
        ]
        return sorted((n for n in found if n.running), key=lambda n: n.port)

    def replicas(self) -> list[RedisClusterNode]:
        """Running replicas, as the cluster sees them."""
        found = [
            self._by_address(entry["address"])
            for entry in self._live_view()
            if "slave" in entry["flags"] and "fail" not in entry["flags"]
        ]
        return sorted((n for n in found if n.running), key=lambda n: n.port)

    def node_of_slot(self, slot: int) -> RedisClusterNode:
        """The master serving `slot` now."""
        for entry in self._live_view():
            if "master" not in entry["flags"] or "fail" in entry["flags"]:
                continue
            for spec in entry["slots"]:
                if spec.startswith("["):
                    continue  # a slot being migrated
                low, _, high = spec.partition("-")
                if int(low) <= slot <= int(high or low):
                    return self._by_address(entry["address"])
        raise KeyError(f"no master serves slot {slot}")

    def _healthy(self) -> bool:
        views: list[str] = []
        for node in self.nodes:
            if not node.running:
                return False
            try:
                if node.info("cluster").get("cluster_state") != "ok":
                    return False
                entries = self._cluster_nodes(node)
                replication = node.info("replication")
            except redis.RedisError:
                return False
            if any(e["flags"] & {"fail", "fail?", "handshake", "noaddr"} for e in entries):
                return False
            if self._covered_by_live_masters(entries) != CLUSTER_SLOTS:
                return False
            slaves = [e for e in entries if "slave" in e["flags"]]
            if len(slaves) != self.masters_count * self.replicas_per_master:
                return False
            if replication["role"] == "slave" and (
                replication.get("master_link_status") != "up"
                or replication.get("master_sync_in_progress") != "0"
            ):
                return False
            masters = sorted(
                f"{e['address']} {' '.join(e['slots'])}"
                for e in entries
                if "master" in e["flags"] and e["slots"]
            )
            views.append("\n".join(masters))
        return len(set(views)) == 1

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until every node is up, says cluster_state:ok and agrees on the slots,
        and every replica is in sync with its master."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis cluster not healthy after {timeout_s:.0f} s: {self.nodes}")

    def _covered_by_live_masters(self, view: list[dict[str, Any]]) -> int:
        covered = 0
        for entry in view:
            if "master" not in entry["flags"] or entry["flags"] & {"fail", "fail?"}:
                continue
            if not self._by_address(entry["address"]).running:
                continue
            for spec in entry["slots"]:
                if spec.startswith("["):
                    continue
                low, _, high = spec.partition("-")
                covered += int(high or low) - int(low) + 1
        return covered

    def wait_failover(self, old_master: RedisClusterNode, timeout_s: float = 30.0) -> float:
        """Wait until replicas took over every slot of the dead `old_master`: every live node
        says cluster_state:ok and every live node's view gives all slots to live masters,
        the same way (a client may ask any of them). Returns the seconds waited."""
        started = time.monotonic()
        deadline = started + timeout_s
        while time.monotonic() < deadline:
            if self._failed_over(old_master):
                return time.monotonic() - started
            time.sleep(0.05)
        raise RuntimeError(f"no failover of {old_master} within {timeout_s:.0f} s")

    def _failed_over(self, old_master: RedisClusterNode) -> bool:
        views: set[str] = set()
        for node in self.nodes:
            if not node.running:
                continue
            try:
                if node.info("cluster").get("cluster_state") != "ok":
                    return False
                view = self._cluster_nodes(node)
            except redis.RedisError:
                return False
            if self._covered_by_live_masters(view) != CLUSTER_SLOTS:
                return False
            if any(e["slots"] for e in view if e["address"] == old_master.address):
                return False
            views.add(
                "\n".join(
                    sorted(
                        f"{e['address']} {' '.join(e['slots'])}"
                        for e in view
                        if "master" in e["flags"] and e["slots"]
                    )
                )
            )
        return len(views) == 1

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A sync RedisCluster client; the caller closes it."""
        kwargs.setdefault("socket_timeout", 5)
        live = [node for node in self.nodes if node.running]
        return redis.RedisCluster(
            startup_nodes=[ClusterNode(n.host, n.port) for n in live], **kwargs
        )

    def flushall(self) -> None:
        """FLUSHALL on every master (replicas follow)."""
        for node in self.masters():
            with node.client() as client:
                client.flushall()

    def __repr__(self) -> str:
        return f"<RedisClusterServers {[n.port for n in self.nodes]}>"


@dataclass(frozen=True)
class StoreBackend:
    """Where store tests keep their keys: a real Redis, fakeredis or a Redis Cluster."""

    name: str
    url: str
    cluster: bool = False

    def client(self) -> aioredis.Redis:
        """A redis-py asyncio client (`decode_responses=True`); the caller closes it.

        On the cluster it is the service's own `RedisCluster` (`connect_redis(...,
        cluster=True)`), with a timeout long enough for a busy test machine.
        """
        if self.cluster:
            return connect_redis(self.url, timeout_s=5.0, cluster=True)
        # fakeredis serves from a thread of the test process: on a busy machine a burst
        # of 50 new connections can take longer than redis-py's 5 s connect timeout.
        return aioredis.Redis.from_url(
            self.url, decode_responses=True, socket_connect_timeout=30, socket_timeout=30
        )
