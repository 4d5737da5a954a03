"""`mqtt-pairing runner` and `mqtt-pairing app pair` (on the SDK) print the same SAS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys

from tests.harness.service import RunningService
from tests.sdk.support import SdkPeers

TIMEOUT_S = 60.0


async def test_the_simulated_runner_and_app_print_the_same_sas(
    running_service: RunningService, sdk: SdkPeers
) -> None:
    runner_id, app_id = sdk.unique("build"), sdk.unique("phone")
    sdk.made += [(sdk.address, runner_id), (sdk.address, app_id)]
    common = ["--mqtt-url", f"mqtt://{sdk.address.host}:{sdk.address.port}", "--prefix", sdk.prefix]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "PAIRING_"))}

    async def cli(*args: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mqtt_pairing", *args, *common,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    runner = await cli("runner", "--id", runner_id, "--name", "Build box", "--no-qr", "--once")
    try:
        assert runner.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(TIMEOUT_S):
            while not any(line.startswith("pairing uri:") for line in lines):
                lines.append((await runner.stdout.readline()).decode())
                assert lines[-1], lines
        code = next(line for line in lines if line.startswith("pairing code:")).split()[2]
        assert re.search(rf"&runner={runner_id}&key=\S+", "".join(lines))
        app = await cli("app", "pair", code, "--id", app_id, "--name", "My phone")
        async with asyncio.timeout(TIMEOUT_S):
            out, err = await app.communicate()
            assert app.returncode == 0, err.decode()
            rest, _ = await runner.communicate()
        assert runner.returncode == 0
        paired = json.loads(out)
        words = paired["sas"]["words"]
        assert len(words.split()) == 4
        assert f"compare with the app: {words}  ({paired['sas']['digits']})" in rest.decode()
    finally:
        if runner.returncode is None:
            runner.kill()
            await runner.wait()
