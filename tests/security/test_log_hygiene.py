"""No secret leaves the service: not in logs at DEBUG, error replies, history or Redis.

Secrets (docs/design.md, "Security model"): pairing codes, `PAIRING_SECRET`, broker and Redis
passwords. A pairing runs with every logger at DEBUG (the service, aiomqtt/paho, redis-py,
amqtt, asyncio) along with the mistakes a client makes with a code in hand (near miss,
bad format, reuse, oversized and malformed payloads, invalid fields), with
Redis protected by a password. Then everything that was written is searched.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from mqtt_pairing.client import ReplyError
from tests.harness.servers import RedisServer
from tests.harness.waiting import wait_until
from tests.security.harness import (
    PAIRING_SECRET,
    SecureBroker,
    app_client,
    runner_client,
    running_service,
)

pytestmark = [pytest.mark.mosquitto, pytest.mark.redis]

REDIS_PASSWORD = "redis-pw-" + uuid.uuid4().hex
LOGGERS = ("", "mqtt_pairing", "mqtt", "aiomqtt", "paho", "redis", "amqtt", "asyncio")


def code_forms(code: str) -> set[str]:
    """How a code may be written: as shown, without dashes, in lower case."""
    compact = code.replace("-", "")
    return {code, compact, code.lower(), compact.lower()}


def dump_redis(client: redis.Redis, prefix: str) -> str:
    """Every key under `prefix` and everything in it, as text."""
    out = []
    for raw_key in client.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw_key.decode()
        kind = client.type(key).decode()
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = client.smembers(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "stream":
            value = client.xrange(key)
        else:
            value = f"<{kind}>"
        out.append(f"{key} {kind} {value!r}")
    return "\n".join(out)


async def test_no_secret_in_logs_replies_history_or_redis(
    make_secure_broker: Callable[..., SecureBroker],
    make_redis_server: Callable[..., RedisServer],
    key_prefix: str,
    uid: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    redis_server = make_redis_server()
    with redis_server.client() as db:
        db.config_set("requirepass", REDIS_PASSWORD)
    redis_url = f"redis://:{REDIS_PASSWORD}@{redis_server.host}:{redis_server.port}/0"
    r1, r2, a1, a2 = f"r1-{uid}", f"r2-{uid}", f"a1-{uid}", f"a2-{uid}"
    broker = make_secure_broker(runners=[r1, r2], apps=[a1, a2])
    prefix = key_prefix.rstrip(":")

    async with (
        running_service(broker, redis_url, key_prefix) as service,
        runner_client(broker, r1) as runner1,
        runner_client(broker, r2) as runner2,
        app_client(broker, a1) as app1,
        app_client(broker, a2) as app2,
    ):
        inbox = app2  # it records every delivery (one connection per identity)
        used = (await runner1.request_code(runner_name="one"))["code"]
        paired = await app1.pair(used, app_name="app one")
        await runner1.next_event()
        # A live code, asked for twice with the same request_id (the replay is sealed).
        first = await runner2.call("code", {"request_id": "code-req-1"})
        again = await runner2.call("code", {"request_id": "code-req-1"})
        live = first["code"]
        assert again["code"] == live

        compact = live.replace("-", "")
        wrong = compact[:-1] + ("0" if compact[-1] != "0" else "1")
        mistakes: list[dict[str, Any]] = [
            {"code": wrong},  # CODE_NOT_FOUND
            {"code": live + "U"},  # INVALID_FORMAT
            {"code": used.lower()},  # CODE_ALREADY_USED
            {"code": 7, "app_name": live},  # invalid field types
            {"code": live, "app_name": live * 10},  # name too long
            {"code": live, "metadata": {"k": live * 200}},  # metadata too large
        ]
        error_replies = []
        for body in mistakes:
            with pytest.raises(ReplyError) as refused:
                await app2.call("pair", body)
            error_replies.append(refused.value.reply)
        await app2.publish_raw("pair", json.dumps({"code": live, "pad": "x" * 5000}).encode())
        await app2.publish_raw("pair", f'{{"request_id": "{live}", "code": '.encode())
        await app2.publish_raw("pair", live.encode())

        def inbox_errors() -> list[dict[str, Any]]:
            return [
                json.loads(payload)
                for topic, payload in inbox.received
                if "/res/" in topic and not json.loads(payload)["ok"]
            ]

        # The inbox sees every error reply of app2: the mistakes and the three raw
        # publishes. (An unknown op never reaches the service: apps.acl refuses it.)
        expected = len(mistakes) + 3
        await wait_until(lambda: len(inbox_errors()) >= expected, 10, f"{expected} error replies")
        assert len(inbox_errors()) == expected, inbox_errors()
        error_replies += inbox_errors()
        assert all(not r["ok"] for r in error_replies)
        assert paired["session"]["runner_id"] == r1
        assert service.gateway.dispatcher.counters["error.INVALID_REQUEST"] >= 6

    with redis.Redis(redis_server.host, redis_server.port, password=REDIS_PASSWORD) as db:
        dump = dump_redis(db, prefix)
    assert f"{prefix}:code:" in dump, "the dump holds the codes' (digest) keys"
    assert f"{prefix}:history:" in dump, "the dump holds the history streams"

    records = caplog.records
    assert any(r.levelno == logging.DEBUG for r in records), "DEBUG was not captured"
    assert any(r.name.startswith("mqtt_pairing") for r in records)
    assert any(r.name == "mqtt" and r.levelno == logging.DEBUG for r in records), "paho"
    assert any("#" in r.getMessage() and "**" in r.getMessage() for r in records), (
        "codes are logged masked"
    )
    log_text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in records
    )
    broker_log = broker.log_path.read_text()
    places = {
        "logs": log_text,
        "error replies": json.dumps(error_replies),
        "redis": dump,
        "broker log": broker_log,
    }
    secrets = {"PAIRING_SECRET": PAIRING_SECRET, "Redis password": REDIS_PASSWORD}
    for (kind, ident), password in broker.passwords.items():
        secrets[f"password of {kind} {ident}"] = password
    for code in (used, live):
        for form in code_forms(code):
            secrets[f"code {code} as {form!r}"] = form
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, value in secrets.items()
        if value in text
    ]
    assert leaks == []
