"""The AsyncAPI 3.0 document of the wire protocol, generated from the pydantic models.

`mqtt-pairing asyncapi` writes it; `docs/asyncapi.yaml` is the committed copy, checked to
be in sync by the tests, validated against the AsyncAPI project's JSON Schema, and used by
the contract test to validate every payload the service publishes. The document describes
the service: it *receives* requests and statuses and *sends* replies and events.

Request schemas come from `mqtt_pairing.models` (what the service accepts), result and
event schemas from `mqtt_pairing.sdk.wire` (what it sends, what the SDK parses). The topic
prefix in addresses is the default, `pairing` (`PAIRING_TOPIC_PREFIX`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from mqtt_pairing import __version__
from mqtt_pairing.models import (
    AppUnpairRequest,
    CodeRequest,
    HeartbeatRequest,
    MessageRequest,
    PairRequest,
    RunnerUnpairRequest,
    SimpleRequest,
)
from mqtt_pairing.sdk import wire
from mqtt_pairing.topics import ID_PATTERN, Kind

__all__ = ["OPS", "Op", "build_document", "render_yaml"]

_REF = "#/components/schemas/{model}"
_MQTT_BINDING = "0.2.0"
_PREFIX = "pairing"


@dataclass(frozen=True)
class Op:
    """One request op: who sends it, its request model and its result model.

    Attributes:
        kind: runner or app.
        name: the op segment of the topic.
        request: the request's pydantic model.
        result: the success result's model; None when only errors are ever replied.
        summary: one line for the document.
    """

    kind: Kind
    name: str
    request: type[BaseModel]
    result: type[BaseModel] | None
    summary: str

    @property
    def stem(self) -> str:
        """`runnerCancelCode`-style id stem."""
        words = self.name.split("-")
        return self.kind.value + "".join(w.capitalize() for w in words)


OPS = (
    Op(Kind.RUNNER, "code", CodeRequest, wire.CodeResult, "Ask for a pairing code."),
    Op(Kind.RUNNER, "cancel-code", SimpleRequest, wire.CancelCodeResult, "Cancel the code."),
    Op(Kind.RUNNER, "sessions", SimpleRequest, wire.SessionsResult, "List active sessions."),
    Op(Kind.RUNNER, "unpair", RunnerUnpairRequest, wire.UnpairResult, "Close sessions."),
    Op(
        Kind.RUNNER,
        "heartbeat",
        HeartbeatRequest,
        None,
        "Say the runner is alive; replied to only when it fails.",
    ),
    Op(
        Kind.RUNNER,
        "message",
        MessageRequest,
        wire.MessageResult,
        "Relay a small object to the app of a session (session.message).",
    ),
    Op(Kind.APP, "pair", PairRequest, wire.PairResult, "Pair with a runner's code."),
    Op(Kind.APP, "sessions", SimpleRequest, wire.SessionsResult, "List active sessions."),
    Op(Kind.APP, "unpair", AppUnpairRequest, wire.UnpairResult, "Close one session."),
    Op(Kind.APP, "status", SimpleRequest, wire.StatusResult, "Paired runners and presence."),
    Op(
        Kind.APP,
        "message",
        MessageRequest,
        wire.MessageResult,
        "Relay a small object to the runner of a session (session.message).",
    ),
)
"""Every request op (docs/protocol.md, "Topics")."""

_EVENTS: dict[Kind, tuple[tuple[str, type[BaseModel], str], ...]] = {
    Kind.RUNNER: (
        ("sessionOpened", wire.SessionOpened, "A session opened (the runner learns of it here)."),
        ("sessionClosed", wire.SessionClosed, "A session closed, for any reason."),
        ("codeUsed", wire.CodeUsed, "The runner's code was used once more."),
        ("sessionMessage", wire.SessionMessage, "The app of a session sent a message."),
    ),
    Kind.APP: (
        ("sessionOpened", wire.SessionOpened, "A session opened."),
        ("sessionClosed", wire.SessionClosed, "A session closed, for any reason."),
        ("runnerPresence", wire.RunnerPresence, "A paired runner went online or offline."),
        ("sessionMessage", wire.SessionMessage, "The runner of a session sent a message."),
    ),
}


def _schemas() -> dict[str, Any]:
    models: list[type[BaseModel]] = [op.request for op in OPS]
    models += [op.result for op in OPS if op.result is not None]
    models += [model for events in _EVENTS.values() for _, model, _ in events]
    models += [wire.ErrorBody, wire.RunnerStatus]
    _, top = models_json_schema(
        [(model, "validation") for model in dict.fromkeys(models)], ref_template=_REF
    )
    schemas: dict[str, Any] = dict(sorted(top.get("$defs", {}).items()))
    schemas["ErrorReply"] = {
        "title": "ErrorReply",
        "description": "An error reply (docs/protocol.md, 'Reply envelope'); request_id is"
        " null only when the payload had no valid request_id.",
        "type": "object",
        "required": ["request_id", "ok", "error"],
        "properties": {
            "request_id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "ok": {"const": False},
            "error": {"$ref": _REF.format(model="ErrorBody")},
        },
    }
    for op in OPS:
        if op.result is None:
            continue
        schemas[f"{op.result.__name__}Reply"] = {
            "title": f"{op.result.__name__}Reply",
            "description": f"A success reply to `{op.name}`.",
            "type": "object",
            "required": ["request_id", "ok", "result"],
            "properties": {
                "request_id": {"type": "string"},
                "ok": {"const": True},
                "result": {"$ref": _REF.format(model=op.result.__name__)},
            },
        }
    return schemas


def _ref(section: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{section}/{name}"}


def _channel(name: str) -> dict[str, str]:
    return {"$ref": f"#/channels/{name}"}


def _id_parameter(kind: Kind) -> dict[str, Any]:
    return {
        "description": f"The {kind.value} id, `{ID_PATTERN.pattern}`; on the shipped broker"
        " config it is the MQTT username (and client id).",
    }


def build_document() -> dict[str, Any]:
    """The AsyncAPI 3.0.0 document as a dict (keys in a fixed order).

    Returns:
        A document that `render_yaml` writes out; deterministic for a given code base.
    """
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    qos1 = {"mqtt": {"qos": 1, "retain": False, "bindingVersion": _MQTT_BINDING}}
    for op in OPS:
        param = f"{op.kind.value}_id"
        base = f"{_PREFIX}/{op.kind.segment}/{{{param}}}"
        request_msg = f"{op.stem}Request"
        reply_msg = f"{op.stem}Reply"
        messages[request_msg] = {
            "name": request_msg,
            "title": f"{op.kind.value} {op.name} request",
            "summary": op.summary,
            "contentType": "application/json",
            "payload": _ref("schemas", op.request.__name__),
            "correlationId": {
                "description": "request_id, echoed in the reply (MQTT 3.1.1 and 5).",
                "location": "$message.payload#/request_id",
            },
            "bindings": {
                "mqtt": {
                    "responseTopic": {
                        "type": "string",
                        "maxLength": 512,
                        "description": "MQTT 5 Response Topic: honoured only under the"
                        f" requester's own `{base}/res/`, without wildcards; at most 512"
                        " bytes, else INVALID_REQUEST on the default reply topic"
                        " (docs/protocol.md, 'Topics').",
                    },
                    "correlationData": {
                        "type": "string",
                        "format": "binary",
                        "description": "MQTT 5 Correlation Data (at most 256 bytes),"
                        " echoed in every reply to a request within the limits.",
                    },
                    "bindingVersion": _MQTT_BINDING,
                }
            },
        }
        ok = [_ref("schemas", f"{op.result.__name__}Reply")] if op.result is not None else []
        expiry = "the code's TTL" if op.name == "code" else "PAIRING_REPLY_EXPIRY_S (600 s)"
        messages[reply_msg] = {
            "name": reply_msg,
            "title": f"{op.kind.value} {op.name} reply",
            "summary": f"The reply to `{op.name}`; MQTT 5: Message Expiry Interval {expiry},"
            " Correlation Data echoed.",
            "contentType": "application/json",
            "payload": {"oneOf": [*ok, _ref("schemas", "ErrorReply")]},
            "correlationId": {"location": "$message.payload#/request_id"},
        }
        channels[f"{op.stem}Request"] = {
            "address": f"{base}/req/{op.name}",
            "title": f"{op.kind.value} {op.name} requests",
            "messages": {request_msg: _ref("messages", request_msg)},
            "parameters": {param: _ref("parameters", param)},
        }
        channels[f"{op.stem}Reply"] = {
            "address": f"{base}/res/{op.name}",
            "title": f"{op.kind.value} {op.name} replies",
            "description": "The default reply topic (without an accepted Response Topic).",
            "messages": {reply_msg: _ref("messages", reply_msg)},
            "parameters": {param: _ref("parameters", param)},
        }
        operations[f"receive{op.stem[0].upper()}{op.stem[1:]}"] = {
            "action": "receive",
            "channel": _channel(f"{op.stem}Request"),
            "summary": op.summary,
            "description": "Requests retained by the broker are ignored and counted, never"
            " executed. Ops with effects are idempotent for 10 minutes under request_id"
            " (docs/protocol.md, 'Idempotency').",
            "messages": [{"$ref": f"#/channels/{op.stem}Request/messages/{request_msg}"}],
            "bindings": qos1,
            "reply": {
                "channel": _channel(f"{op.stem}Reply"),
                "messages": [{"$ref": f"#/channels/{op.stem}Reply/messages/{reply_msg}"}],
            },
        }
    for kind, events in _EVENTS.items():
        param = f"{kind.value}_id"
        channel = f"{kind.value}Events"
        names = []
        for name, model, summary in events:
            message = f"{kind.value}{name[0].upper()}{name[1:]}"
            names.append(message)
            messages[message] = {
                "name": message,
                "title": name,
                "summary": summary,
                "contentType": "application/json",
                "payload": _ref("schemas", model.__name__),
            }
        channels[channel] = {
            "address": f"{_PREFIX}/{kind.segment}/{{{param}}}/events",
            "title": f"{kind.value} events",
            "description": "Every event carries an event_id; a client that sees one twice"
            " drops the copy. Events may be sent more than once, never lost.",
            "messages": {m: _ref("messages", m) for m in names},
            "parameters": {param: _ref("parameters", param)},
        }
        operations[f"send{kind.value.capitalize()}Events"] = {
            "action": "send",
            "channel": _channel(channel),
            "messages": [{"$ref": f"#/channels/{channel}/messages/{m}"} for m in names],
            "bindings": qos1,
        }
    messages["runnerStatus"] = {
        "name": "runnerStatus",
        "title": "runner status",
        "summary": "A runner's presence, retained; also its Last Will (offline).",
        "contentType": "application/json",
        "payload": _ref("schemas", "RunnerStatus"),
    }
    channels["runnerStatus"] = {
        "address": f"{_PREFIX}/runners/{{runner_id}}/status",
        "title": "runner presence",
        "description": "Published by the runner (retained, QoS 1) and by the broker for it"
        " (its Last Will). docs/protocol.md, 'Presence'.",
        "messages": {"runnerStatus": _ref("messages", "runnerStatus")},
        "parameters": {"runner_id": _ref("parameters", "runner_id")},
    }
    operations["receiveRunnerStatus"] = {
        "action": "receive",
        "channel": _channel("runnerStatus"),
        "messages": [{"$ref": "#/channels/runnerStatus/messages/runnerStatus"}],
        "bindings": {"mqtt": {"qos": 1, "retain": True, "bindingVersion": _MQTT_BINDING}},
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "mqtt-pairing",
            "version": __version__,
            "description": "Pairs runners with mobile apps through an MQTT broker. Generated by"
            " `mqtt-pairing asyncapi` from the code's models; the prose contract is"
            " docs/protocol.md. Topic prefix: `pairing` (PAIRING_TOPIC_PREFIX). Payloads are"
            " UTF-8 JSON objects of at most 4096 bytes; unknown fields are ignored.",
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": _servers(),
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": _schemas(),
            "messages": messages,
            "parameters": {
                "runner_id": _id_parameter(Kind.RUNNER),
                "app_id": _id_parameter(Kind.APP),
            },
        },
    }


def _servers() -> dict[str, Any]:
    persistent = {
        "mqtt": {
            "cleanSession": False,
            "sessionExpiryInterval": 86400,
            "bindingVersion": _MQTT_BINDING,
        }
    }
    return {
        "runners": {
            "host": "broker:1883",
            "protocol": "mqtt",
            "protocolVersion": "5",
            "description": "Runners (username = runner id). MQTT 3.1.1 works as well; TLS"
            " listeners use mqtts (docs/security.md).",
            "bindings": copy.deepcopy(persistent),
        },
        "apps": {
            "host": "broker:1884",
            "protocol": "mqtt",
            "protocolVersion": "5",
            "description": "Apps over MQTT (username = app id).",
            "bindings": copy.deepcopy(persistent),
        },
        "apps-websockets": {
            "host": "broker:8083",
            "pathname": "/mqtt",
            "protocol": "ws",
            "description": "Apps over MQTT on WebSockets (browsers; the web app of web/).",
        },
    }


def render_yaml(document: dict[str, Any] | None = None) -> str:
    """The document as YAML, as committed in `docs/asyncapi.yaml`."""
    header = "# Generated by `mqtt-pairing asyncapi`; do not edit (docs/sdk.md, 'AsyncAPI').\n"
    body = yaml.safe_dump(
        document if document is not None else build_document(),
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )
    return header + body
