"""Identity binding: a username is one identity of one kind, and the service acts only for it.

The service trusts the id in the topic (docs/protocol.md, "Identities") because the broker lets
a client publish only under its own username's subtree, on its own kind's listener. These
tests try to break each half of that with broker-config/ as shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable

import aiomqtt
import pytest
from typer.testing import CliRunner

from mqtt_pairing.cli.main import app as cli_app
from mqtt_pairing.client import ReplyError
from mqtt_pairing.mqtt_address import NODELAY, BrokerAddress
from tests.harness.servers import RedisServer, require_binary
from tests.security.harness import (
    SERVICE_USER,
    SecureBroker,
    Sniffer,
    app_client,
    runner_client,
    running_service,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

SETTLE_S = 0.4
_cli = CliRunner()
LISTENERS = ("runner", "app", "app-ws", "service")


@contextlib.asynccontextmanager
async def connection(
    address: BrokerAddress, *, v311: bool = False
) -> AsyncIterator[aiomqtt.Client]:
    client = aiomqtt.Client(
        address.host,
        address.port,
        username=address.username,
        password=address.password,
        identifier=f"probe-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V311 if v311 else aiomqtt.ProtocolVersion.V5,
        transport=address.transport,
        websocket_path=address.websocket_path,
        socket_options=[NODELAY],
        timeout=5,
    )
    async with client:
        yield client


async def can_connect(address: BrokerAddress, *, v311: bool = False) -> bool:
    try:
        async with connection(address, v311=v311):
            return True
    except aiomqtt.MqttError:
        return False


async def publish_until_refused(client: aiomqtt.Client, topic: str) -> None:
    """Publish every 50 ms for up to 2.5 s; the broker dropping the connection raises."""
    for _ in range(50):
        await client.publish(topic, b"{}", qos=1)
        await asyncio.sleep(0.05)


def _on(broker: SecureBroker, address: BrokerAddress, listener: str) -> BrokerAddress:
    """The same credentials, pointed at another listener."""
    return BrokerAddress(
        host=address.host,
        port=broker.ports[listener],
        transport="websockets" if listener == "app-ws" else "tcp",
        websocket_path="/mqtt" if listener == "app-ws" else None,
        username=address.username,
        password=address.password,
    )


async def test_a_username_belongs_to_one_kind(
    make_secure_broker: Callable[..., SecureBroker], uid: str
) -> None:
    dual, runner_only, app_only = f"dual-{uid}", f"r-{uid}", f"a-{uid}"
    broker = make_secure_broker(runners=[dual, runner_only], apps=[app_only])
    # `credentials add` refuses a name of two kinds and `credentials check` refuses such
    # files (test_credentials_check.py). Written with plain mosquitto_passwd anyway, the
    # two identities still stay apart: each listener knows its own kind's file only.
    refused = _cli.invoke(
        cli_app,
        ["credentials", "add", "app", dual, "--password-file", str(broker.password_file("app"))],
    )
    assert refused.exit_code == 1
    broker.passwords["app", dual] = "dual-app-password"
    passwd = require_binary("mosquitto_passwd")
    app_file = str(broker.password_file("app"))
    subprocess.run(
        [passwd, "-b", app_file, dual, broker.passwords["app", dual]],
        check=True,
        capture_output=True,
    )
    broker.reload()
    for _ in range(50):  # the reload is asynchronous
        if await can_connect(broker.address("app", dual)):
            break
        await asyncio.sleep(0.05)
    credentials = {
        "runner": [broker.address("runner", runner_only), broker.address("runner", dual)],
        "app": [broker.address("app", app_only), broker.address("app", dual)],
        "service": [broker.address("service", SERVICE_USER)],
    }
    home = {"runner": {"runner"}, "app": {"app", "app-ws"}, "service": {"service"}}
    outcomes = {}
    for kind, addresses in credentials.items():
        for address in addresses:
            for listener in LISTENERS:
                target = _on(broker, address, listener)
                outcomes[kind, address.username, listener] = await can_connect(target)
    expected = {
        (kind, address.username, listener): listener in home[kind]
        for kind, addresses in credentials.items()
        for address in addresses
        for listener in LISTENERS
    }
    assert outcomes == expected
    # MQTT 3.1.1 is refused the same way.
    assert not await can_connect(_on(broker, credentials["runner"][0], "app"), v311=True)
    assert not await can_connect(_on(broker, credentials["app"][0], "runner"), v311=True)
    # No anonymous access and no wrong password anywhere.
    for listener in LISTENERS:
        anonymous = _on(broker, broker.address("runner", runner_only), listener)
        anonymous = BrokerAddress(
            anonymous.host,
            anonymous.port,
            anonymous.transport,
            websocket_path=anonymous.websocket_path,
        )
        assert not await can_connect(anonymous), listener
        wrong = broker.address("runner", runner_only, listener=listener, password="wrong")
        assert not await can_connect(wrong), listener


async def test_a_client_cannot_make_the_service_act_for_another_id(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    uid: str,
) -> None:
    x, y, r = f"rx-{uid}", f"ry-{uid}", f"rr-{uid}"
    p, q = f"ap-{uid}", f"aq-{uid}"
    broker = make_secure_broker(runners=[x, y, r], apps=[p, q])
    prefix = key_prefix.rstrip(":")
    async with (
        running_service(broker, redis_server.url, key_prefix) as service,
        Sniffer(broker.address("runner", x), "x") as as_x,
        runner_client(broker, y) as runner_y,
        runner_client(broker, r) as runner_r,
        app_client(broker, q) as app_q,
        app_client(broker, p) as app_p,
    ):
        # One connection per identity: P forges through its own client, and Y's and Q's
        # clients record all they receive.
        as_p, y_inbox, q_inbox = app_p, runner_y, app_q

        # Runner X asks for a code in Y's name: no code is issued for Y.
        await as_x.publish(f"pairing/runners/{y}/req/code", b'{"request_id":"x-for-y"}')
        # ...and says Y is offline: Y's presence does not change.
        await runner_y.publish_status("online")
        await as_x.publish(f"pairing/runners/{y}/status", b'{"state":"offline"}', retain=True)
        assert await runner_y.sessions() == []
        await asyncio.sleep(SETTLE_S)
        assert y_inbox.topics() == [f"pairing/runners/{y}/res/sessions"]
        with redis_server.client() as db:
            assert db.hget(f"{prefix}:runner:{{runner:{y}}}", "code") is None
            assert not list(db.scan_iter(match=f"{prefix}:dedupe:{{runner:{y}}}:*"))

        # Q pairs with R. App P then tries to close Q's session, in Q's name and in its own.
        code = (await runner_r.request_code())["code"]
        session_q = (await app_q.pair(code))["session"]["session_id"]
        await as_p.publish(
            f"pairing/apps/{q}/req/unpair",
            json.dumps({"request_id": "p-for-q", "session_id": session_q}).encode(),
        )
        with pytest.raises(ReplyError) as refused:
            await app_p.unpair(session_q)
        assert refused.value.code == "SESSION_NOT_FOUND"
        assert [s["session_id"] for s in await app_q.sessions()] == [session_q]

        # P pairs in Q's name with R's next code: nothing happens for Q, the code stays
        # live, and when P uses it in its own name the session is P's.
        code2 = (await runner_r.request_code())["code"]
        await as_p.publish(
            f"pairing/apps/{q}/req/pair",
            json.dumps({"request_id": "p-for-q-2", "code": code2}).encode(),
        )
        await asyncio.sleep(SETTLE_S)
        assert [s["session_id"] for s in await app_q.sessions()] == [session_q]
        session_p = (await app_p.pair(code2))["session"]
        assert session_p["app_id"] == p
        assert [s["session_id"] for s in await app_q.sessions()] == [session_q]

        # Y is still online (not RUNNER_OFFLINE) and can pair.
        code_y = (await runner_y.request_code())["code"]
        assert (await app_q.pair(code_y))["session"]["runner_id"] == y
        received_by_q = {t for t in q_inbox.topics() if "/res/" in t}
        assert received_by_q == {f"pairing/apps/{q}/res/{op}" for op in ("pair", "sessions")}
        counters = service.gateway.dispatcher.counters
        assert counters["ok.unpair"] == 0
        assert counters["error.SESSION_NOT_FOUND"] == 1
        assert counters["ok.code"] == 3
        assert counters["ok.pair"] == 3


async def test_rotated_and_removed_credentials_take_effect_on_reload(
    make_secure_broker: Callable[..., SecureBroker], uid: str
) -> None:
    ident = f"r-{uid}"
    broker = make_secure_broker(runners=[ident])
    old = broker.address("runner", ident)
    cli = CliRunner()
    password_file = str(broker.password_file("runner"))

    rotated = cli.invoke(
        cli_app,
        ["credentials", "add", "runner", ident, "--replace", "--password-file", password_file],
    )
    assert rotated.exit_code == 0, rotated.output
    new_password = rotated.stdout.splitlines()[1].removeprefix("password: ")
    broker.reload()
    new = broker.address("runner", ident, password=new_password)
    for _ in range(50):  # the reload is asynchronous
        if not await can_connect(old):
            break
        await asyncio.sleep(0.05)
    assert not await can_connect(old)
    assert await can_connect(new)

    async with connection(new) as connected:
        removed = cli.invoke(
            cli_app, ["credentials", "remove", "runner", ident, "--password-file", password_file]
        )
        assert removed.exit_code == 0, removed.output
        broker.reload()
        # Mosquitto checks connected clients again on reload and disconnects this one.
        with pytest.raises(aiomqtt.MqttError):
            await publish_until_refused(connected, f"pairing/runners/{ident}/status")
    assert not await can_connect(new)
