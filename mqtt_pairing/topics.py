"""MQTT topic scheme: building, parsing and the Response Topic rule (pure, no I/O).

Topics are those of docs/protocol.md, "Topics", under a configurable prefix ``P``::

    P/runners/{runner_id}/req/{op}    P/apps/{app_id}/req/{op}
    P/runners/{runner_id}/res/{op}    P/apps/{app_id}/res/{op}
    P/runners/{runner_id}/events      P/apps/{app_id}/events
    P/runners/{runner_id}/status

Ids and ops are checked with full-match semantics (docs/protocol.md, "Identities"): a message
on a topic with a malformed id or op is dropped with no reply; a well-formed but unknown
op is answered with INVALID_REQUEST by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

__all__ = [
    "APP_OPS",
    "ID_PATTERN",
    "MAX_TOPIC_BYTES",
    "OP_PATTERN",
    "RUNNER_OPS",
    "DropReason",
    "Identity",
    "Kind",
    "RequestTopic",
    "TopicDrop",
    "TopicScheme",
    "is_valid_id",
    "is_valid_op",
    "ops_for",
]

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""runner_id / app_id (docs/protocol.md, "Identities"); use `is_valid_id` (full match)."""

OP_PATTERN = re.compile(r"^[a-z][a-z-]{0,31}$")
"""Op segment (docs/protocol.md, "Identities"); use `is_valid_op` (full match)."""

MAX_TOPIC_BYTES = 65535
"""Longest MQTT topic name, in UTF-8 bytes."""


class Kind(StrEnum):
    """The two kinds of clients; a username belongs to one kind only."""

    RUNNER = "runner"
    APP = "app"

    @property
    def segment(self) -> str:
        """Topic segment of this kind: ``"runners"`` or ``"apps"``."""
        return f"{self.value}s"


_KIND_BY_SEGMENT = {kind.segment: kind for kind in Kind}

RUNNER_OPS = frozenset({"code", "cancel-code", "sessions", "unpair", "heartbeat", "message"})
"""Ops a runner may request (docs/protocol.md, "Topics")."""

APP_OPS = frozenset({"pair", "sessions", "unpair", "status", "message"})
"""Ops an app may request (docs/protocol.md, "Topics")."""

DropReason = Literal["bad_prefix", "bad_kind", "bad_id", "bad_op", "bad_shape"]


def ops_for(kind: Kind) -> frozenset[str]:
    """Known ops of a kind of client.

    Args:
        kind: runner or app.

    Returns:
        `RUNNER_OPS` or `APP_OPS`.
    """
    return RUNNER_OPS if kind is Kind.RUNNER else APP_OPS


def is_valid_id(value: str) -> bool:
    """Whether `value` is a well-formed runner_id / app_id (1-64 chars, `ID_PATTERN`).

    Args:
        value: the candidate id.

    Returns:
        True only for a full match (an id with a trailing newline is refused).
    """
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def is_valid_op(value: str) -> bool:
    """Whether `value` is a well-formed op segment (1-32 chars, `OP_PATTERN`).

    Args:
        value: the candidate op.

    Returns:
        True only for a full match; the op may still be unknown (see `ops_for`).
    """
    return isinstance(value, str) and OP_PATTERN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Identity:
    """A client: its kind and its id (bound by the broker to its MQTT username).

    Attributes:
        kind: runner or app (a plain ``"runner"``/``"app"`` string is converted).
        id: the runner_id or app_id.

    Raises:
        ValueError: the kind is unknown or the id is malformed.
    """

    kind: Kind
    id: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if not is_valid_id(self.id):
            raise ValueError("malformed id")


@dataclass(frozen=True, slots=True)
class RequestTopic:
    """A request topic that parsed: who sent it and the (well-formed) op.

    Attributes:
        identity: the requester, taken from the topic.
        op: a well-formed op segment; it may be unknown for the kind (see `known_op`).

    Raises:
        ValueError: the op is malformed.
    """

    identity: Identity
    op: str

    def __post_init__(self) -> None:
        if not is_valid_op(self.op):
            raise ValueError("malformed op")

    @property
    def known_op(self) -> bool:
        """Whether the op is one of the requester's kind; if not, reply INVALID_REQUEST."""
        return self.op in ops_for(self.identity.kind)


@dataclass(frozen=True, slots=True)
class TopicDrop:
    """A topic that must be dropped (and counted) with no reply.

    Attributes:
        reason: ``bad_prefix``, ``bad_kind``, ``bad_id``, ``bad_op`` or ``bad_shape``.
    """

    reason: DropReason


def _check_level_name(value: str, what: str) -> None:
    if not value or value.startswith("/") or value.endswith("/") or "//" in value:
        raise ValueError(f"{what} must be non-empty levels separated by single '/'")
    if any(c in value for c in "+#\x00"):
        raise ValueError(f"{what} must not contain '+', '#' or NUL")
    if value.startswith("$"):
        raise ValueError(f"{what} must not start with '$'")


@dataclass(frozen=True, slots=True)
class TopicScheme:
    """Builds and parses the topics of docs/protocol.md under one prefix.

    Attributes:
        prefix: the topic prefix ``P`` (setting ``PAIRING_TOPIC_PREFIX``); one or more
            non-empty levels, no wildcard, no NUL, not starting with ``$``.

    Raises:
        ValueError: the prefix is not acceptable.
    """

    prefix: str = "pairing"

    def __post_init__(self) -> None:
        _check_level_name(self.prefix, "topic prefix")

    def _base(self, identity: Identity) -> str:
        return f"{self.prefix}/{identity.kind.segment}/{identity.id}"

    def request_filter(self, kind: Kind, share_group: str = "") -> str:
        """Subscription filter for all requests of one kind.

        Args:
            kind: runner or app.
            share_group: an MQTT 5 shared-subscription group name, or "" for none.

        Returns:
            ``P/{segment}/+/req/+``, or ``$share/{group}/P/{segment}/+/req/+``.

        Raises:
            ValueError: the share group contains ``/``, ``+``, ``#`` or NUL.
        """
        topic_filter = f"{self.prefix}/{Kind(kind).segment}/+/req/+"
        if not share_group:
            return topic_filter
        if any(c in share_group for c in "/+#\x00"):
            raise ValueError("share group must not contain '/', '+', '#' or NUL")
        return f"$share/{share_group}/{topic_filter}"

    def status_filter(self) -> str:
        """Subscription filter for runner presence: ``P/runners/+/status``."""
        return f"{self.prefix}/{Kind.RUNNER.segment}/+/status"

    def parse_request(self, topic: str) -> RequestTopic | TopicDrop:
        """Parse ``P/{runners|apps}/{id}/req/{op}``.

        Args:
            topic: the topic a message arrived on.

        Returns:
            `RequestTopic` when prefix, kind, shape, id and op are well-formed (the op may
            be unknown: check `RequestTopic.known_op`), else `TopicDrop` with the first
            problem found (the message is dropped with no reply).
        """
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return TopicDrop("bad_prefix")
        parts = topic[len(head) :].split("/")
        if len(parts) != 4 or parts[2] != "req":
            return TopicDrop("bad_shape")
        segment, ident, _, op = parts
        kind = _KIND_BY_SEGMENT.get(segment)
        if kind is None:
            return TopicDrop("bad_kind")
        if not is_valid_id(ident):
            return TopicDrop("bad_id")
        if not is_valid_op(op):
            return TopicDrop("bad_op")
        return RequestTopic(Identity(kind, ident), op)

    def parse_status(self, topic: str) -> str | None:
        """Parse ``P/runners/{runner_id}/status``.

        Args:
            topic: the topic a status message arrived on.

        Returns:
            The runner id, or None when the topic is anything else or the id is malformed.
        """
        head = f"{self.prefix}/{Kind.RUNNER.segment}/"
        tail = "/status"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        runner_id = topic[len(head) : len(topic) - len(tail)]
        return runner_id if is_valid_id(runner_id) else None

    def request_topic(self, identity: Identity, op: str) -> str:
        """Topic a client publishes a request on: ``P/{segment}/{id}/req/{op}``.

        Raises:
            ValueError: the op is malformed.
        """
        if not is_valid_op(op):
            raise ValueError("malformed op")
        return f"{self._base(identity)}/req/{op}"

    def reply_topic(self, identity: Identity, op: str) -> str:
        """Default reply topic: ``P/{segment}/{id}/res/{op}``.

        Raises:
            ValueError: the op is malformed.
        """
        if not is_valid_op(op):
            raise ValueError("malformed op")
        return f"{self._base(identity)}/res/{op}"

    def events_topic(self, identity: Identity) -> str:
        """Events topic of a client: ``P/{segment}/{id}/events``."""
        return f"{self._base(identity)}/events"

    def status_topic(self, runner_id: str) -> str:
        """Presence topic of a runner: ``P/runners/{runner_id}/status``.

        Raises:
            ValueError: the runner id is malformed.
        """
        return f"{self._base(Identity(Kind.RUNNER, runner_id))}/status"

    def accept_response_topic(self, identity: Identity, response_topic: str | None) -> bool:
        """Whether an MQTT 5 Response Topic may be honoured (docs/protocol.md, "Topics").

        It must match the filter ``P/{segment}/{id}/res/#`` of the requester: be its
        ``res`` level or lie under it (the same filter as the shipped ACLs: the requester
        may read it, the service may write it, so a reply sent there is delivered), with
        no wildcard, no NUL and no unencodable text, in at most 65535 UTF-8 bytes.
        Anything else gets the default `reply_topic`.

        Args:
            identity: the requester, from the request topic.
            response_topic: the Response Topic property, or None when absent.

        Returns:
            True if the reply goes to `response_topic`; False if it goes to `reply_topic`.
        """
        if not isinstance(response_topic, str):
            return False
        try:
            encoded = response_topic.encode("utf-8")
        except UnicodeEncodeError:
            return False
        if len(encoded) > MAX_TOPIC_BYTES or any(c in response_topic for c in "+#\x00"):
            return False
        res = f"{self._base(identity)}/res"
        return response_topic == res or response_topic.startswith(f"{res}/")
