"""The simulated runner announces itself: `app status` and `runner.offline` seen by hand.

`mqtt-pairing runner` runs as a process, as a person would start it, against a running
service: on real Mosquitto + Redis, and on the embedded broker (amqtt) + in-memory store.
It publishes a retained `online` status when it connects and sets a retained Last Will
`offline`; a paired app's `status` shows `online: true`, a killed runner (the broker
publishes its Will) and a runner stopped with Ctrl-C (it says `offline` itself) both give
the app `runner.offline` and `online: false`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import aiomqtt
import pytest

from mqtt_pairing.broker import start_embedded_broker
from mqtt_pairing.cli import peers
from mqtt_pairing.client import AppClient, RunnerClient
from mqtt_pairing.config import load_settings
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.service import build_service
from tests.harness.servers import REPO_ROOT, MosquittoBroker, RedisServer, free_port
from tests.service.support import RunningService, instance_settings, start_running

pytestmark = pytest.mark.timeout(180)

START_TIMEOUT_S = 60.0
"""A `runner` process imports the package and connects: seconds, more on a loaded machine."""
PRESENCE_TIMEOUT_S = 15.0
"""Bound on status -> service -> app: the broker's part (Will on a dropped socket) included."""
STOP_TIMEOUT_S = 30.0
"""Signal -> the process has exited. Ctrl-C alone may wait 5 s by design (the CLI's bound
on the `offline` goodbye being acknowledged), then Python's exit; a loaded 2-core machine
(the other test worker flooding a broker) stretches both."""
POLL_S = 0.1
CLIENT_TIMEOUT_S = 10.0
"""The peers' MQTT client timeout (mqtt_pairing.client): what a stuck CONNECT would cost."""

CODE_LINE = re.compile(r"^pairing code: (\S+)")

Serve = Callable[[], Awaitable[RunningService]]


@pytest.fixture(params=["mosquitto", "amqtt"])
async def serve(
    request: pytest.FixtureRequest, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[RunningService]:
    """A running service on Mosquitto + Redis, or on the embedded broker + memory store."""
    for name in list(os.environ):
        if name.startswith(("MQTT_", "REDIS_", "PAIRING_")):
            monkeypatch.delenv(name)
    client_id = f"svc:{uuid.uuid4().hex[:12]}"
    if request.param == "mosquitto":
        broker: MosquittoBroker = request.getfixturevalue("mosquitto_broker")
        redis: RedisServer = request.getfixturevalue("redis_server")
        values = instance_settings(
            topic_prefix,
            f"rp-{uuid.uuid4().hex[:12]}",
            mqtt_url=broker.url,
            redis_url=redis.url,
            mqtt_client_id=client_id,
        )
        service = await build_service(load_settings(**values))
        address = BrokerAddress.from_url(broker.url)
    else:
        port = free_port()
        settings = load_settings(
            pairing_topic_prefix=topic_prefix,
            mqtt_client_id=client_id,
            pairing_shutdown_grace_s=2.0,
        )
        service = await build_service(settings, listen=f"127.0.0.1:{port}")
        address = BrokerAddress("127.0.0.1", port)
    running = await start_running(service, address, topic_prefix)
    try:
        yield running
    finally:
        await running.stop()


def protocol_of(running: RunningService) -> Literal["5", "3.1.1"]:
    return "3.1.1" if running.service.broker is not None else "5"


class RunnerProcess:
    """`python -m mqtt_pairing runner ...`; its stdout and stderr are read all along.

    Both pipes are drained as the runner writes (a pipe nobody reads blocks the writer
    once full), stdout line by line. The runner runs with faulthandler on, so a runner
    that does not stop is made to dump its stacks (SIGABRT) into the failure message.
    """

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._err = bytearray()
        assert process.stdout is not None
        assert process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_lines(process.stdout)),
            asyncio.create_task(self._read_all(process.stderr)),
        ]

    async def _read_lines(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
        self._new_line.set()

    async def _read_all(self, stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65_536):
            self._err += chunk

    async def code(self) -> str:
        """The first pairing code the runner prints."""
        seen = 0
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while True:
                    for line in self.lines[seen:]:
                        if match := CODE_LINE.match(line):
                            return match.group(1)
                    seen = len(self.lines)
                    assert self.process.returncode is None, (
                        f"the runner exited: {self.lines} {await self.stderr()}"
                    )
                    self._new_line.clear()
                    await self._new_line.wait()
        except TimeoutError:
            pytest.fail(f"no pairing code within {START_TIMEOUT_S} s; it printed {self.lines}")

    async def stderr(self) -> str:
        """What the runner wrote on stderr (all of it once it has exited)."""
        if self.process.returncode is not None:
            await asyncio.gather(*self._readers, return_exceptions=True)
        return self._err.decode(errors="replace")

    async def close(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def stop(self, sig: int) -> int:
        self.process.send_signal(sig)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                return await self.process.wait()
        except TimeoutError:
            self.process.send_signal(signal.SIGABRT)  # faulthandler dumps every stack
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 10)
            pytest.fail(
                f"the runner did not exit within {STOP_TIMEOUT_S} s of signal {sig}; "
                f"stdout {self.lines[-20:]}; stderr: {(await self.stderr())[-6000:]}"
            )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.asynccontextmanager
async def runner_process(running: RunningService, runner_id: str) -> AsyncIterator[RunnerProcess]:
    address = running.address
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "REDIS_", "PAIRING_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mqtt_pairing",
        "runner",
        "--id",
        runner_id,
        "--no-qr",
        "--mqtt-url",
        f"mqtt://{address.host}:{address.port}",
        "--prefix",
        running.prefix,
        "--protocol",
        protocol_of(running),
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Ctrl-C as at a terminal: under a non-interactive shell's background job (as in
        # .ci/run) SIGINT is inherited as ignored, and Python then never raises
        # KeyboardInterrupt for it.
        preexec_fn=_default_sigint,
    )
    runner = RunnerProcess(process)
    try:
        yield runner
    finally:
        if process.returncode is None:
            process.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        await runner.close()


async def online_of(app: AppClient, runner_id: str) -> bool | None:
    status = await app.status()
    (entry,) = [r for r in status["runners"] if r["runner_id"] == runner_id]
    online: bool | None = entry["online"]
    return online


async def until_online_is(app: AppClient, runner_id: str, expected: bool) -> None:
    seen: list[bool | None] = []
    try:
        async with asyncio.timeout(PRESENCE_TIMEOUT_S):
            while (online := await online_of(app, runner_id)) is not expected:
                seen.append(online)
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        pytest.fail(f"`status` never showed online: {expected} (saw {seen[-5:]})")


async def next_presence(app: AppClient) -> dict[str, Any]:
    skipped: list[str] = []
    try:
        async with asyncio.timeout(PRESENCE_TIMEOUT_S):
            while True:
                event = await app.next_event(PRESENCE_TIMEOUT_S)
                if event["event"] in ("runner.online", "runner.offline"):
                    return event
                skipped.append(event["event"])
    except TimeoutError:
        pytest.fail(f"no runner.online/offline within {PRESENCE_TIMEOUT_S} s (saw {skipped})")


async def retained_status(running: RunningService, runner_id: str) -> dict[str, Any]:
    """What a new subscriber to the runner's status topic gets: the retained message."""
    address = running.address
    topic = f"{running.prefix}/runners/{runner_id}/status"
    version = (
        aiomqtt.ProtocolVersion.V311
        if protocol_of(running) == "3.1.1"
        else aiomqtt.ProtocolVersion.V5
    )
    async with aiomqtt.Client(
        address.host, address.port, identifier=f"probe-{uuid.uuid4().hex[:8]}", protocol=version
    ) as probe:
        await probe.subscribe(topic, qos=1)
        try:
            async with asyncio.timeout(PRESENCE_TIMEOUT_S):
                async for message in probe.messages:
                    assert message.retain
                    body: dict[str, Any] = json.loads(bytes(message.payload))  # type: ignore[arg-type]
                    return body
        except TimeoutError:
            pytest.fail(f"no retained status on {topic} within {PRESENCE_TIMEOUT_S} s")
    raise AssertionError("unreachable")


async def test_runner_is_online_then_offline_when_killed_or_stopped(
    serve: RunningService,
) -> None:
    runner_id = f"r-{uuid.uuid4().hex[:8]}"
    app = AppClient("a1", serve.address, prefix=serve.prefix, protocol=protocol_of(serve))
    async with app:
        async with runner_process(serve, runner_id) as runner:
            code = await runner.code()
            session = (await app.pair(code))["session"]
            assert session["runner_id"] == runner_id
            await until_online_is(app, runner_id, expected=True)
            assert await retained_status(serve, runner_id) == {"state": "online"}

            # Killed: no goodbye, the broker publishes the Last Will.
            await runner.stop(signal.SIGKILL)
            event = await next_presence(app)
            assert event["event"] == "runner.offline"
            assert event["runner_id"] == runner_id
            assert event["session_id"] == session["session_id"]
            assert await online_of(app, runner_id) is False
            assert await retained_status(serve, runner_id) == {"state": "offline"}

        async with runner_process(serve, runner_id) as runner:
            await runner.code()
            assert (await next_presence(app))["event"] == "runner.online"
            assert await online_of(app, runner_id) is True

            # Ctrl-C: the runner publishes `offline` itself and exits without a traceback.
            code_on_exit = await runner.stop(signal.SIGINT)
            assert (await next_presence(app))["event"] == "runner.offline"
            assert await online_of(app, runner_id) is False
            assert code_on_exit == 130
            assert "Traceback" not in await runner.stderr()


async def test_auto_protocol_gives_up_mqtt5_with_a_will_on_amqtt_in_time(topic_prefix: str) -> None:
    # amqtt answers an MQTT 5 CONNECT carrying a Last Will with silence (it misreads the
    # will properties), so `--protocol auto` must not wait the whole client timeout
    # before falling back to 3.1.1.
    port = free_port()
    broker = await start_embedded_broker("127.0.0.1", port)
    try:
        will = aiomqtt.Will(
            f"{topic_prefix}/runners/r1/status", '{"state":"offline"}', qos=1, retain=True
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        client = await peers._connect(
            RunnerClient, "r1", BrokerAddress("127.0.0.1", port), topic_prefix, "auto", will=will
        )
        elapsed_s = loop.time() - started
        try:
            assert client.protocol == "3.1.1"
            assert elapsed_s < CLIENT_TIMEOUT_S, elapsed_s
            assert client.client.timeout == CLIENT_TIMEOUT_S  # restored after the probe
        finally:
            await client.__aexit__(None, None, None)
    finally:
        await broker.shutdown()
