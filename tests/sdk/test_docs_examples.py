"""The examples of docs/sdk.md run as written, against the real service and Mosquitto.

Each block after a `<!-- tested: NAME -->` marker is written to a file and run with
python; the runner prints its code, the app pairs with it, both print the same SAS.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

from tests.sdk.support import SdkPeers
from tests.service.support import RunningService

DOC = Path(__file__).resolve().parents[2] / "docs" / "sdk.md"
EXAMPLE = re.compile(r"<!-- tested: (\S+) -->\n```python\n(.*?)```", re.S)
TIMEOUT_S = 60.0


def examples() -> dict[str, str]:
    found = dict(EXAMPLE.findall(DOC.read_text("utf-8")))
    assert set(found) == {"runner.py", "app.py"}
    return found


async def line_with(process: asyncio.subprocess.Process, prefix: str) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(TIMEOUT_S):
        while line := (await process.stdout.readline()).decode():
            if line.startswith(prefix):
                return line.strip()
    stderr = await process.stderr.read() if process.stderr else b""
    raise AssertionError(f"no line {prefix!r}: {stderr.decode()[-2000:]}")


async def test_the_runner_and_app_examples_pair_and_show_the_same_sas(
    running_service: RunningService, sdk: SdkPeers, tmp_path: Path
) -> None:
    for name, source in examples().items():
        (tmp_path / name).write_text(source, "utf-8")
    runner_id, app_id = sdk.unique("build"), sdk.unique("phone")
    sdk.made += [(sdk.address, runner_id), (sdk.address, app_id)]
    env = {
        **os.environ,
        "MQTT_URL": f"mqtt://{sdk.address.host}:{sdk.address.port}",
        "PAIRING_TOPIC_PREFIX": sdk.prefix,
        "RUNNER_ID": runner_id,
        "APP_ID": app_id,
    }

    started: list[asyncio.subprocess.Process] = []

    async def run(*args: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            env=env,
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        started.append(process)
        return process

    runner = await run("runner.py")
    try:
        announced = await line_with(runner, "code: ")
        link = announced.split("link: ")[1]
        assert "&key=" in link
        app = await run("app.py", link)
        app_paired = await line_with(app, "paired with Build box; compare: ")
        assert (await line_with(app, "session ")).endswith(f"with {runner_id}")
        runner_paired = await line_with(runner, f"paired with {app_id}; compare: ")
        sas = app_paired.split("compare: ")[1]
        assert runner_paired.split("compare: ")[1] == sas
        assert len(sas.split()) == 4
        assert await line_with(runner, "session closed") == "session closed (unpaired_by_app)"
        async with asyncio.timeout(TIMEOUT_S):
            assert await app.wait() == 0
            assert await runner.wait() == 0
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                await process.wait()
