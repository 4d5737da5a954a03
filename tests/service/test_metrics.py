"""Instance identity in metrics and logs (issue 8: several instances side by side).

Two instances on one broker and one Redis: each serves `/metrics` (Prometheus text
format) with its own `instance` label and its own counts, and `serve`'s log lines name
the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from uuid import uuid4

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqtt_pairing import logs
from mqtt_pairing.cli.common import setup_logging
from mqtt_pairing.client import ReplyError
from tests.harness.servers import free_port
from tests.service.support import Peers, RunningService, StartService


async def scrape(running: RunningService) -> tuple[str, dict[tuple[str, tuple[str, ...]], float]]:
    """(content type, {(sample name, sorted label items): value}) of `/metrics`."""
    health = running.service.health
    assert health is not None
    reader, writer = await asyncio.open_connection(health.host, health.port)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0].split(" ")[1] == "200", lines[0]
    content_type = next(
        v for k, _, v in (h.partition(": ") for h in lines[1:]) if k == "Content-Type"
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    return content_type, samples


async def test_each_instance_reports_its_own_counts_under_its_own_label(
    start_service: StartService, peers: Peers
) -> None:
    # Each with its Redis state of its own: both handle every request afresh.
    one = await start_service(
        pairing_health_listen=f"127.0.0.1:{free_port()}", pairing_key_prefix="m1-" + uuid4().hex
    )
    two = await start_service(
        pairing_health_listen=f"127.0.0.1:{free_port()}", pairing_key_prefix="m2-" + uuid4().hex
    )
    id_one, id_two = one.service.gateway.instance_id, two.service.gateway.instance_id
    assert id_one != id_two
    # Without a shared group both instances answer every request: each counts its own.
    async with peers.runner("r1") as runner, peers.app("a1") as app:
        await runner.request_code()
        with pytest.raises(ReplyError):
            await app.pair("ZZZ-ZZZ-ZZZ")
    for running, instance in ((one, id_one), (two, id_two)):
        content_type, samples = await scrape(running)
        assert content_type.startswith("text/plain; version=0.0.4")
        label = ("instance", instance)
        assert samples[("mqtt_pairing_info", (label, ("version", "0.1.0")))] == 1
        assert samples[("mqtt_pairing_broker_connected", (label,))] == 1
        code_ok = ("mqtt_pairing_replies_total", (label, ("op", "code"), ("outcome", "ok")))
        not_found = (
            "mqtt_pairing_replies_total",
            (label, ("op", "pair"), ("outcome", "CODE_NOT_FOUND")),
        )
        assert samples[code_ok] >= 1
        assert samples[not_found] >= 1
        assert samples[("mqtt_pairing_redis_round_trips_total", (label,))] > 0
        others = {labels for name, labels in samples if dict(labels).get("instance") != instance}
        assert not others, others


def test_log_lines_name_the_instance(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []
    try:
        setup_logging("INFO")
        logging.getLogger("mqtt_pairing.test").info("before")
        logs.set_instance("svc-1/0a1b2c3d")
        logging.getLogger("mqtt_pairing.test").info("after")
    finally:
        logs.set_instance("-")
        for handler in root.handlers:
            root.removeHandler(handler)
        root.handlers = saved
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith(" INFO - mqtt_pairing.test: before"), err
    assert err[1].endswith(" INFO svc-1/0a1b2c3d mqtt_pairing.test: after"), err
