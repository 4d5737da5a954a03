"""`python -m mqtt_pairing serve` as a real process: the service as an operator runs it.

`ServeProcess` starts `serve` with a clean environment (no MQTT_*, REDIS_*, PAIRING_* from
the outer shell) plus the settings given, logs to a file, and is ready when its `/readyz`
answers 200 (with `PAIRING_HEALTH_LISTEN`) or its log says it connected to the broker.
`kill()` is a SIGKILL (a crash: nothing flushed, nothing acknowledged); `terminate()` a
SIGTERM with a bounded wait. The `serve_process` fixture (tests/harness/fixtures.py)
makes them with the test's prefixes and kills every one after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.servers import REPO_ROOT

SERVE_READY_TIMEOUT_S = 30.0
CONNECTED_LINE = "connected to the broker"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without MQTT_*, REDIS_*, PAIRING_* settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("MQTT_", "REDIS_", "PAIRING_", "MQTT_PAIRING_FAULT"))
    }
    env.update(extra)
    return env


async def http_get(host: str, port: int, path: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """GET `path` over HTTP/1.0; (status, JSON body)."""
    status, body = await http_text(host, port, path, timeout_s)
    return status, json.loads(body) if body else None


async def http_text(host: str, port: int, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """GET `path` over HTTP/1.0; (status, body as text)."""
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode(errors="replace")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` in a Prometheus text
    exposition (0 when there are none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{want}"' in head for key, want in labels.items()):
            total += float(value)
    return total


async def probe(host: str, port: int, path: str) -> int | None:
    """The status of one probe, or None when the server does not answer."""
    try:
        return (await http_get(host, port, path, timeout_s=3.0))[0]
    except (OSError, TimeoutError, IndexError, ValueError):
        return None


def _read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")
    except OSError:
        return ""


class ServeProcess:
    """`python -m mqtt_pairing serve` in a subprocess, logging to a file.

    Args:
        env: the settings (environment variables) on top of a clean environment.
        log_path: where its stdout and stderr go.
        args: extra command-line arguments of `serve` (e.g. `--listen`).
        separate_stderr: stderr to `log_path` + ".err" instead (`stderr()`), for tests of
            what the command prints where.
        log_level: `--log-level` (None: the command's default).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        args: tuple[str, ...] = (),
        *,
        separate_stderr: bool = False,
        log_level: str | None = "INFO",
    ) -> None:
        self.env = env
        self.log_path = log_path
        self.err_path = log_path.with_name(log_path.name + ".err") if separate_stderr else None
        self.args = args
        self.log_level = log_level
        self.health: tuple[str, int] | None = None
        if env.get("PAIRING_HEALTH_LISTEN"):
            host, _, port = env["PAIRING_HEALTH_LISTEN"].rpartition(":")
            self.health = (host, int(port))
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._err_start = 0

    def start(self) -> None:
        """Start the process (a restart logs on after the previous run's lines)."""
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._err_start = (
            self.err_path.stat().st_size if self.err_path and self.err_path.exists() else 0
        )
        level = ("--log-level", self.log_level) if self.log_level else ()
        command = [sys.executable, "-m", "mqtt_pairing", "serve", *level, *self.args]
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab"))
            err = files.enter_context(self.err_path.open("ab")) if self.err_path else None
            self.process = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=clean_env(**self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=err if err is not None else subprocess.STDOUT,
            )

    @property
    def command(self) -> list[str]:
        """The command line it runs (or ran)."""
        assert self.process is not None
        return [str(a) for a in self.process.args]  # type: ignore[union-attr]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def output(self) -> str:
        """Everything this run (since the last `start`) has written (stderr included)."""
        return self.stdout() + self.stderr()

    def stdout(self) -> str:
        """What this run wrote to stdout (and stderr, unless `separate_stderr`)."""
        return _read_from(self.log_path, self._log_start)

    def stderr(self) -> str:
        """What this run wrote to stderr, with `separate_stderr` ("" otherwise)."""
        return _read_from(self.err_path, self._err_start) if self.err_path else ""

    def log(self, lines: int = 40) -> str:
        """The last `lines` lines of the log (every run)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, timeout_s: float = SERVE_READY_TIMEOUT_S) -> float:
        """Wait until it serves (`/readyz` 200, or connected to the broker); seconds waited.

        Fails the test if the process exits first or the bound passes.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not await self._ready():
            if self.returncode is not None:
                pytest.fail(f"serve exited with {self.returncode}:\n{self.log()}")
            if loop.time() - started > timeout_s:
                pytest.fail(f"serve not ready after {timeout_s} s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return loop.time() - started

    async def _ready(self) -> bool:
        if self.health is not None:
            return await probe(*self.health, "/readyz") == 200
        return CONNECTED_LINE in self.output()

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end; its return code (negative: killed by a signal)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (code := self.returncode) is None:
            if loop.time() > deadline:
                pytest.fail(f"serve still running after {timeout_s} s:\n{self.log()}")
            await asyncio.sleep(0.02)
        return code

    def wait(self, timeout_s: float) -> int:
        """Wait (blocking) for the process to end; its return code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        """SIGKILL this process (a crash: nothing flushed, nothing acknowledged)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM and wait (`timeout_s`, then SIGKILL); the return code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode
