"""The reference web app in headless Chromium, against the real service and Mosquitto.

Mosquitto runs broker-config/mosquitto.conf as shipped (its WebSockets listener for apps,
passwords, ACLs); the service runs in-process; a runner built on the SDK asks for a code;
the page (served by `mqtt_pairing.sdk.webapp`, driven by playwright-core with Debian's
Chromium, web/tests/browser.mjs) pairs from the runner's pairing link, shows the SAS the
runner derived, and unpairs. It also computes the SAS vectors with WebCrypto, and closes
a pairing whose runner key is of low order. The screenshot is kept in
$MQTT_PAIRING_ARTIFACTS (default: the test's tmp_path).

Needs `npm ci` in web/ and /usr/bin/chromium (`.ci/run` installs both); fails rather than
skips without them when CI=true.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from mqtt_pairing.sdk import RunnerClient, SessionClosed, SessionOpened
from mqtt_pairing.sdk.e2e import KeyPair
from mqtt_pairing.sdk.webapp import WebApp, default_web_dir
from tests.harness.servers import RedisServer
from tests.sdk.support import next_of
from tests.security.harness import SecureBroker, running_service

REPO = Path(__file__).resolve().parents[2]
VECTORS = REPO / "tests" / "data" / "vectors" / "sas.json"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
STEP_TIMEOUT_S = 60.0


def require(ok: bool, what: str) -> None:
    if ok:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: the browser test must run)")
    pytest.skip(what)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    directory = Path(os.environ.get("MQTT_PAIRING_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def read_step(process: asyncio.subprocess.Process, step: str) -> dict[str, Any]:
    assert process.stdout is not None
    async with asyncio.timeout(STEP_TIMEOUT_S):
        while True:
            line = await process.stdout.readline()
            if not line:
                stderr = await process.stderr.read() if process.stderr else b""
                pytest.fail(f"the browser script ended before {step!r}: {stderr.decode()[-3000:]}")
            message: dict[str, Any] = json.loads(line)
            if message["step"] == step:
                return message


async def test_web_app_pairs_shows_the_runners_sas_and_unpairs(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    artifacts: Path,
) -> None:
    web_dir = default_web_dir()
    require(shutil.which("node") is not None, "node is not installed")
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} is not installed")
    require((web_dir / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in web/")
    uid = uuid.uuid4().hex[:8]
    runner_id, app_id = f"runner-{uid}", f"phone-{uid}"
    broker = make_secure_broker(runners=[runner_id], apps=[app_id])
    ws_url = f"ws://{broker.host}:{broker.ports['app-ws']}/mqtt"
    server, page_url = WebApp(web_dir, ws_url).start()
    screenshot = artifacts / "web-app-paired.png"
    try:
        async with (
            running_service(broker, redis_server.url, f"web-{uid}"),
            RunnerClient(
                runner_id, broker.address("runner", runner_id), name="Build box"
            ) as runner,
        ):
            code = await runner.request_code()
            # The runner's pairing link, opened as a web link: ?code=...&runner=...&key=...
            # A link that also names a broker, an app id and a prefix: the page must not
            # take them (a link must not send the app to another broker).
            hostile = "mqtt_url=ws%3A%2F%2Fevil.example%3A8083%2Fmqtt&app_id=evil&prefix=evil"
            link = f"{page_url}?{urlsplit(code.pairing_uri).query}&{hostile}"
            args = {
                "url": link,
                "appId": app_id,
                "password": broker.passwords["app", app_id],
                "appName": "Chromium",
                "vectors": str(VECTORS),
                "screenshot": str(screenshot),
            }
            process = await asyncio.create_subprocess_exec(
                "node",
                str(web_dir / "tests" / "browser.mjs"),
                json.dumps(args),
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "CHROMIUM": CHROMIUM},
            )
            try:
                loaded = await read_step(process, "loaded")
                assert loaded["mqttUrl"] == ws_url  # the page's config.json, not the link's
                assert loaded["prefix"] == "pairing"
                assert loaded["appId"] == ""
                assert code.code.replace("-", "") in loaded["code"]
                vectors = (await read_step(process, "vectors"))["computed"]
                expected = json.loads(VECTORS.read_text("utf-8"))["derivations"]
                for got, case in zip(vectors, expected, strict=True):
                    assert got["words"] == got["runnerWords"] == case["sas_words"]
                    assert got["digits"] == case["sas_digits"]
                    assert got["sessionKey"] == case["session_key"]
                    assert got["keyId"] == case["runner_key_id"]
                    assert got["runnerNonce"] == case["runner_nonce"]
                    assert got["appCommitmentField"] == case["app_commitment_field"]
                    assert got["appMessage"] == case["app_message"]

                paired = await read_step(process, "paired")
                assert paired["sasShown"]
                opened = await next_of(runner, SessionOpened, STEP_TIMEOUT_S)
                assert opened.e2e == "ready"
                assert opened.session.session_id == paired["sessionId"]
                assert opened.session.app_id == app_id
                assert opened.session.app_name == "Chromium"
                assert opened.sas is not None
                assert paired["words"] == list(opened.sas.words)
                assert paired["digits"] == opened.sas.digits
                assert paired["runner"] == f"Build box ({runner_id})"

                await read_step(process, "unpaired")
                closed = await next_of(runner, SessionClosed, STEP_TIMEOUT_S)
                assert closed.session.session_id == paired["sessionId"]
                assert closed.session.closed_reason == "unpaired_by_app"
                assert await runner.sessions() == []
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        server.shutdown()
        server.server_close()
    assert screenshot.stat().st_size > 0
    print(f"screenshot: {screenshot}")


async def test_web_app_closes_a_pairing_with_a_low_order_runner_key(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    artifacts: Path,
) -> None:
    """The runner's `public_key` is a point of order 1 (what a relay could substitute):
    the page shows an error and unpairs, as the SDK does."""
    web_dir = default_web_dir()
    require(shutil.which("node") is not None, "node is not installed")
    require(Path(CHROMIUM).exists(), f"{CHROMIUM} is not installed")
    require((web_dir / "node_modules" / "playwright-core").is_dir(), "run `npm ci` in web/")
    uid = uuid.uuid4().hex[:8]
    runner_id, app_id = f"runner-{uid}", f"phone-{uid}"
    broker = make_secure_broker(runners=[runner_id], apps=[app_id])
    ws_url = f"ws://{broker.host}:{broker.ports['app-ws']}/mqtt"
    server, page_url = WebApp(web_dir, ws_url).start()
    try:
        async with (
            running_service(broker, redis_server.url, f"web-{uid}"),
            RunnerClient(runner_id, broker.address("runner", runner_id)) as runner,
        ):
            # The runner still answers the app's commitment with a nonce (with a key of
            # its own); the app sees only the low-order key.
            runner.keys.add(KeyPair.generate())
            low_order = "x25519:AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
            code = await runner.call("code", {"public_key": low_order})
            args = {
                "url": f"{page_url}?{urlsplit(code['pairing_uri']).query}",
                "appId": app_id,
                "password": broker.passwords["app", app_id],
                "appName": "Chromium",
                "vectors": str(VECTORS),
                "screenshot": str(artifacts / "web-app-low-order.png"),
                "expectError": True,
            }
            process = await asyncio.create_subprocess_exec(
                "node",
                str(web_dir / "tests" / "browser.mjs"),
                json.dumps(args),
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "CHROMIUM": CHROMIUM},
            )
            try:
                failed = await read_step(process, "pairError")
                assert "the runner's key is unusable" in (failed["error"] or "")
                assert "the pairing was closed" in failed["error"]
                opened = await next_of(runner, SessionOpened, STEP_TIMEOUT_S)
                closed = await next_of(runner, SessionClosed, STEP_TIMEOUT_S)
                assert closed.session.session_id == opened.session.session_id
                assert closed.session.closed_reason == "unpaired_by_app"
                assert await runner.sessions() == []
                async with asyncio.timeout(STEP_TIMEOUT_S):
                    assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    finally:
        server.shutdown()
        server.server_close()
