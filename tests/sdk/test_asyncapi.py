"""docs/asyncapi.yaml: in sync with the code, valid AsyncAPI 3.0, and what the service sends.

The AsyncAPI project's own JSON Schema comes from its npm package `@asyncapi/specs`
(installed by `npm ci` in web/, as `.ci/run` does).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from mqtt_pairing.asyncapi import build_document, render_yaml
from mqtt_pairing.cli.main import app as cli
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sdk import ReplyError, RunnerPresence, SessionClosed, SessionOpened
from tests.harness.recorder import Recorder, pairing_filters, recording
from tests.harness.recorder import Recorder as Sniffer
from tests.harness.service import RunningService
from tests.sdk.contract import DOCUMENT, Contract, ContractViolation
from tests.sdk.support import SdkPeers, next_of

SPECS = Path(__file__).resolve().parents[2] / "web" / "node_modules" / "@asyncapi" / "specs"


def asyncapi_schema() -> dict[str, Any]:
    path = SPECS / "schemas" / "3.0.0-without-$id.json"
    if not path.exists():
        message = f"{path} missing: run `npm ci` in web/"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return json.loads(path.read_text("utf-8"))


def test_the_committed_document_is_in_sync() -> None:
    assert DOCUMENT.read_text("utf-8") == render_yaml(), (
        "docs/asyncapi.yaml is stale: run `mqtt-pairing asyncapi --out docs/asyncapi.yaml`"
    )


def test_the_command_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "asyncapi.yaml"
    assert CliRunner().invoke(cli, ["asyncapi", "--out", str(out)]).exit_code == 0
    assert out.read_text("utf-8") == render_yaml()
    assert CliRunner().invoke(cli, ["asyncapi", "--check", str(out)]).exit_code == 0
    out.write_text(out.read_text("utf-8").replace("session.opened", "session.open"))
    stale = CliRunner().invoke(cli, ["asyncapi", "--check", str(out)])
    assert stale.exit_code == 1
    assert "out of date" in stale.output


def test_the_document_is_valid_asyncapi_3() -> None:
    document = yaml.safe_load(DOCUMENT.read_text("utf-8"))
    validator = jsonschema.Draft7Validator(asyncapi_schema())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []


def test_the_schema_check_would_catch_a_broken_document() -> None:
    document = build_document()
    document["operations"]["receiveAppPair"]["action"] = "publish"  # AsyncAPI 2 wording
    validator = jsonschema.Draft7Validator(asyncapi_schema())
    assert list(validator.iter_errors(json.loads(json.dumps(document))))


def test_every_reference_resolves() -> None:
    document = yaml.safe_load(DOCUMENT.read_text("utf-8"))

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    found = refs(document)
    assert len(found) > 50
    for ref in found:
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        assert isinstance(node, dict), ref


def test_the_checker_catches_drift() -> None:
    contract = Contract("p")
    event = {
        "event": "code.used",
        "event_id": "e1",
        "at": "2026-11-29T12:00:00.000Z",
        "uses_left": 0,
    }
    assert contract.validate("p/runners/r1/events", json.dumps(event).encode()) == "runnerCodeUsed"
    assert contract.validate("p/runners/r1/req/code", b"anything") is None
    for drifted in (
        {**event, "new_field": 1},  # code sends a field the document lacks
        {**event, "uses_left": "0"},  # a type changed
        {k: v for k, v in event.items() if k != "at"},  # a field went missing
        {**event, "at": "2026-11-29T12:00:00Z"},  # the timestamp format changed
    ):
        with pytest.raises(ContractViolation):
            contract.validate("p/runners/r1/events", json.dumps(drifted).encode())


async def test_everything_the_service_publishes_matches_the_document(
    running_service: RunningService, sdk: SdkPeers, sniffer: Sniffer
) -> None:
    """A tour of every op and event, success and error replies alike."""
    contract = Contract(sdk.prefix)
    async with sdk.app(name="Phone") as app:
        async with sdk.runner(name="Build box") as runner:
            code = await runner.request_code(metadata={"os": "linux"})
            paired = await app.pair(code.code, metadata={"model": "x"})
            with pytest.raises(ReplyError):
                await app.pair(code.code)  # CODE_ALREADY_USED
            with pytest.raises(ReplyError):
                await app.pair("not a code")  # INVALID_FORMAT
            await app.publish_raw("pair", b"[]")  # INVALID_REQUEST, request_id null
            await app.sessions()
            await app.status()
            await runner.sessions()
            await runner.heartbeat()
            await runner.publish_raw("heartbeat", b'{"request_id": 5}')  # an error reply
            await runner.request_code(e2e=False)
            assert await runner.cancel_code()
            assert not await runner.cancel_code()
            await app.unpair(paired.session.session_id)
            with pytest.raises(ReplyError):
                await runner.unpair(session_id="no-such-session")
            assert await runner.unpair(all=True) == 0
            await app.pair((await runner.request_code()).code)
            await runner.unpair(app_id=app.id)
            again = await app.pair((await runner.request_code()).code)
        # The runner said `offline` as it closed: the app hears of it.
        assert not (await next_of(app, RunnerPresence)).online
        await app.unpair(again.session.session_id)
        await next_of(app, SessionClosed)
    published = [
        m for m in sniffer.under(sdk.prefix) if "/res/" in m.topic or m.topic.endswith("/events")
    ]
    matched = {contract.validate(m.topic, m.payload) for m in published}
    assert None not in matched
    assert {
        "runnerCodeReply",
        "runnerCancelCodeReply",
        "runnerSessionsReply",
        "runnerUnpairReply",
        "runnerHeartbeatReply",
        "appPairReply",
        "appSessionsReply",
        "appUnpairReply",
        "appStatusReply",
        "runnerSessionOpened",
        "runnerSessionClosed",
        "runnerCodeUsed",
        "appSessionOpened",
        "appSessionClosed",
        "appRunnerPresence",
        # The end-to-end exchange: the runner's nonce and the app's reveal.
        "runnerMessageReply",
        "appMessageReply",
        "runnerSessionMessage",
        "appSessionMessage",
    } <= matched


async def test_the_shared_recorder_checks_every_reply_and_event(
    running_service: RunningService, sdk: SdkPeers, recorder: Recorder
) -> None:
    """The harness's `recorder` hands what it captures to the contract checker."""
    contract = next(c.__self__ for c in recorder._checkers if isinstance(c.__self__, Contract))  # type: ignore[attr-defined]
    async with sdk.runner() as runner, sdk.app() as app:
        await app.pair((await runner.request_code()).code)
        await next_of(runner, SessionOpened)
    await recorder.barrier()
    assert contract.checked >= 5  # code and pair replies, opened x2, code.used, ...
    assert recorder.problems == []


async def test_the_recorder_reports_a_payload_the_document_does_not_allow(
    broker_address: BrokerAddress, topic_prefix: str
) -> None:
    async with recording(
        broker_address, *pairing_filters(topic_prefix), prefix=topic_prefix
    ) as recorded:
        recorded.add_checker(Contract(topic_prefix).checker)
        drifted = {"event": "code.used", "event_id": "e", "at": "now", "uses_left": 0}
        await recorded.publish(f"{topic_prefix}/runners/r1/events", json.dumps(drifted))
        await recorded.wait_for(lambda: recorded.problems != [], "the checker's verdict")
    assert "ContractViolation" in recorded.problems[0]
    with pytest.raises(AssertionError):
        recorded.assert_checked()
