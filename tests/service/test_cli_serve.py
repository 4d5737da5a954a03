"""`python -m mqtt_pairing serve` as a process: clean stop on SIGTERM, one-line startup errors."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mqtt_pairing.mqtt_address import BrokerAddress
from tests.harness.peers import Peers
from tests.harness.serve import ServeProcess
from tests.harness.servers import free_port

START_TIMEOUT_S = 120.0  # several serve processes start at once on a possibly slow machine
STOP_TIMEOUT_S = 10.0
SECRET = "s" * 40


def serve(log_dir: Path, port: int, **env: str) -> ServeProcess:
    """`serve --listen 127.0.0.1:PORT` (the embedded broker), stdout and stderr apart."""
    log = log_dir / f"serve-{port}.log"
    return ServeProcess(
        env, log, ("--listen", f"127.0.0.1:{port}"), separate_stderr=True, log_level=None
    )


async def test_sigterm_stops_cleanly(topic_prefix: str, tmp_path: Path) -> None:
    port = free_port()
    process = serve(tmp_path, port, PAIRING_TOPIC_PREFIX=topic_prefix)
    process.start()
    try:
        # "connected to the broker": subscribed, so a request now is not lost
        await process.wait_ready(START_TIMEOUT_S)
        # It really serves: a runner gets a code over the embedded broker.
        peers = Peers(BrokerAddress("127.0.0.1", port), topic_prefix)
        async with peers.runner("r1", protocol="3.1.1") as runner:
            assert (await runner.request_code(timeout_s=5))["code"]

        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        code = await process.wait_exit(STOP_TIMEOUT_S)
        output = process.output()
        assert code == 0, output
        assert "Traceback" not in output
        assert "stopped" in output
    finally:
        process.kill()


@pytest.fixture(scope="module")
def startup_failures(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, subprocess.CompletedProcess[str]]]:
    """`serve` started once per failure case, all at once (each takes ~1-2 s to fail)."""
    log_dir = tmp_path_factory.mktemp("serve-failures")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        closed_redis = f"127.0.0.1:{free_port()}"
        cases: dict[str, tuple[int, dict[str, str]]] = {
            "port_taken": (taken_port, {}),
            "health_port_taken": (
                free_port(),
                {"PAIRING_HEALTH_LISTEN": f"127.0.0.1:{taken_port}"},
            ),
            "redis_unreachable": (
                free_port(),
                {"REDIS_URL": f"redis://{closed_redis}/0", "PAIRING_SECRET": SECRET},
            ),
            "redis_password": (
                free_port(),
                {
                    "REDIS_URL": f"redis://:hunter2secret@{closed_redis}/0",
                    "PAIRING_SECRET": SECRET,
                },
            ),
            "no_secret": (free_port(), {"REDIS_HOST": "127.0.0.1"}),
            "redis_port_url": (
                free_port(),
                {"REDIS_HOST": "x", "REDIS_PORT": "tcp://10.0.0.5:6379"},
            ),
            "short_secret": (
                free_port(),
                {"REDIS_HOST": "127.0.0.1", "PAIRING_SECRET": "tooshort-secret"},
            ),
        }
        processes = {name: serve(log_dir, port, **env) for name, (port, env) in cases.items()}
        results: dict[str, subprocess.CompletedProcess[str]] = {}
        try:
            for process in processes.values():
                process.start()
            for name, process in processes.items():
                code = process.wait(START_TIMEOUT_S)
                results[name] = subprocess.CompletedProcess(
                    process.command, code, process.stdout(), process.stderr()
                )
        finally:
            for process in processes.values():
                process.kill()
        yield results


Failures = dict[str, subprocess.CompletedProcess[str]]


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The process failed, without a traceback, and its last line on stderr is `error: ...`.

    Returns:
        That line.
    """
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result
    assert lines[-1].startswith("error: "), result.stderr
    assert sum("error:" in line for line in lines) == 1, result.stderr
    return lines[-1]


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Like `error_line`, and that line is all there is on stderr."""
    line = error_line(result)
    assert result.stderr.strip().splitlines() == [line], result.stderr
    return line


def test_listen_port_taken(startup_failures: Failures) -> None:
    result = startup_failures["port_taken"]
    line = error_line(result)
    assert "--listen" in line
    assert result.args[-1] in line  # 127.0.0.1:<port>


def test_listen_port_taken_is_one_line(startup_failures: Failures) -> None:
    one_error_line(startup_failures["port_taken"])


def test_health_port_taken(startup_failures: Failures) -> None:
    assert "PAIRING_HEALTH_LISTEN" in error_line(startup_failures["health_port_taken"])


def test_redis_unreachable(startup_failures: Failures) -> None:
    assert "Redis" in error_line(startup_failures["redis_unreachable"])


def test_redis_unreachable_is_one_line(startup_failures: Failures) -> None:
    one_error_line(startup_failures["redis_unreachable"])


def test_redis_password_is_not_shown(startup_failures: Failures) -> None:
    result = startup_failures["redis_password"]
    error_line(result)
    assert "hunter2secret" not in result.stderr + result.stdout


def test_external_redis_needs_a_secret(startup_failures: Failures) -> None:
    assert "PAIRING_SECRET" in one_error_line(startup_failures["no_secret"])


def test_redis_port_as_a_url_is_named(startup_failures: Failures) -> None:
    line = one_error_line(startup_failures["redis_port_url"])
    assert "REDIS_PORT" in line
    assert "10.0.0.5" not in line


def test_short_secret_is_named_without_its_value(startup_failures: Failures) -> None:
    result = startup_failures["short_secret"]
    assert "PAIRING_SECRET" in one_error_line(result)
    assert "tooshort-secret" not in result.stderr + result.stdout
