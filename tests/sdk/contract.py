"""The contract checker: a payload the service published, against docs/asyncapi.yaml.

`Contract.validate(topic, payload)` finds the document's channel for the topic (the
test's topic prefix in place of `pairing`) and checks the payload against the schemas of
that channel's messages. Every object schema is closed for the check (no property the
document does not name), so a field added in code but not in the document fails as surely
as a wrong type or a missing field. Topics the service only receives on (requests,
statuses) are not checked: tests send hostile payloads there on purpose.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "asyncapi.yaml"


class ContractViolation(AssertionError):
    """A payload the document does not allow on its topic."""


def _closed(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _closed(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_closed(v) for v in node]
    return node


@dataclass
class Contract:
    """Checks what the service publishes under one topic prefix."""

    prefix: str
    document: dict[str, Any] = field(
        default_factory=lambda: yaml.safe_load(DOCUMENT.read_text("utf-8"))
    )
    checked: int = 0

    def __post_init__(self) -> None:
        doc = self.document
        self._root = copy.deepcopy(doc)
        self._root["components"]["schemas"] = _closed(doc["components"]["schemas"])
        sent = {
            op["channel"]["$ref"].rsplit("/", 1)[-1]
            for op in doc["operations"].values()
            if op["action"] == "send"
        }
        sent |= {
            op["reply"]["channel"]["$ref"].rsplit("/", 1)[-1]
            for op in doc["operations"].values()
            if "reply" in op
        }
        self._channels: list[tuple[re.Pattern[str], str, list[str]]] = []
        for name, channel in doc["channels"].items():
            address = channel["address"].removeprefix("pairing/")
            pattern = re.escape(f"{self.prefix}/") + re.sub(
                r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(address)
            )
            messages = [m["$ref"].rsplit("/", 1)[-1] for m in channel["messages"].values()]
            if name in sent:
                self._channels.append((re.compile(pattern), name, messages))

    def validate(self, topic: str, payload: bytes) -> str | None:
        """Check one payload the service published on `topic`.

        Returns:
            The message name it matched, or None for a topic the service does not publish
            on (not checked).

        Raises:
            ContractViolation: no message of the topic's channel accepts the payload.
        """
        for pattern, channel, messages in self._channels:
            if not pattern.fullmatch(topic):
                continue
            try:
                body = json.loads(payload)
            except ValueError as exc:
                raise ContractViolation(f"{topic}: not JSON ({exc})") from None
            problems = []
            for message in messages:
                schema = {**self._root, "$ref": f"#/components/messages/{message}/payload"}
                error = jsonschema.exceptions.best_match(
                    jsonschema.Draft7Validator(schema).iter_errors(body)
                )
                if error is None:
                    self.checked += 1
                    return message
                problems.append(f"{message}: {error.message} at {list(error.absolute_path)}")
            raise ContractViolation(f"{topic} ({channel}): {body!r}\n  " + "\n  ".join(problems))
        return None
