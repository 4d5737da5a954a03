"""Tests of mqtt_pairing.topics: docs/protocol.md "Identities" and "Topics"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from mqtt_pairing.topics import (
    APP_OPS,
    ID_PATTERN,
    OP_PATTERN,
    RUNNER_OPS,
    Identity,
    Kind,
    RequestTopic,
    TopicDrop,
    TopicScheme,
    is_valid_id,
    is_valid_op,
    ops_for,
)

SCHEME = TopicScheme()
RUNNER = Identity(Kind.RUNNER, "abc")
APP = Identity(Kind.APP, "abc")

valid_ids = st.from_regex(ID_PATTERN, fullmatch=True)
valid_ops = st.from_regex(OP_PATTERN, fullmatch=True)
kinds = st.sampled_from(list(Kind))

HOSTILE_IDS = [
    "",
    "a/b",
    "+",
    "#",
    "a+",
    "a#",
    "a\x00",
    "\x00",
    "é",
    "runner\u202e",
    "a" * 65,
    "-abc",
    ".abc",
    "_abc",
    "abc\n",
    "abc ",
    "\uff41bc",  # full-width a
]
HOSTILE_OPS = ["", "Pair", "pair\n", "-pair", "pa_ir", "pa/ir", "+", "#", "p\x00", "é", "a" * 33]


def test_kinds_and_ops() -> None:
    assert Kind.RUNNER.segment == "runners"
    assert Kind.APP.segment == "apps"
    assert (
        ops_for(Kind.RUNNER)
        == RUNNER_OPS
        == {
            "code",
            "cancel-code",
            "sessions",
            "unpair",
            "heartbeat",
            "message",
        }
    )
    assert ops_for(Kind.APP) == APP_OPS == {"pair", "sessions", "unpair", "status", "message"}
    assert all(is_valid_op(op) for op in RUNNER_OPS | APP_OPS)


@pytest.mark.parametrize("value", ["a", "A.b_c-9", "0" * 64, "x" + "-" * 63])
def test_valid_ids(value: str) -> None:
    assert is_valid_id(value)
    assert Identity(Kind.APP, value).id == value


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_hostile_ids_are_refused(value: str) -> None:
    assert not is_valid_id(value)
    with pytest.raises(ValueError, match="id"):
        Identity(Kind.RUNNER, value)


@pytest.mark.parametrize("value", ["a", "cancel-code", "a" * 32, "a-"])
def test_valid_ops(value: str) -> None:
    assert is_valid_op(value)


@pytest.mark.parametrize("value", HOSTILE_OPS)
def test_hostile_ops_are_refused(value: str) -> None:
    assert not is_valid_op(value)


def test_identity_converts_plain_kind_strings() -> None:
    assert Identity("app", "x").kind is Kind.APP  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="apps"):
        Identity("apps", "x")  # type: ignore[arg-type]


def test_filters() -> None:
    assert SCHEME.request_filter(Kind.RUNNER) == "pairing/runners/+/req/+"
    assert SCHEME.request_filter(Kind.APP, "svc") == "$share/svc/pairing/apps/+/req/+"
    assert SCHEME.status_filter() == "pairing/runners/+/status"
    assert TopicScheme("acme/pair").request_filter(Kind.APP) == "acme/pair/apps/+/req/+"


@pytest.mark.parametrize("group", ["a/b", "a+", "#", "a\x00"])
def test_bad_share_group_is_refused(group: str) -> None:
    with pytest.raises(ValueError, match="share group"):
        SCHEME.request_filter(Kind.RUNNER, group)


@pytest.mark.parametrize(
    "prefix", ["", "/pairing", "pairing/", "a//b", "pair+", "pair#", "$SYS", "a\x00"]
)
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="topic prefix"):
        TopicScheme(prefix)


def test_builders() -> None:
    assert SCHEME.request_topic(RUNNER, "code") == "pairing/runners/abc/req/code"
    assert SCHEME.reply_topic(RUNNER, "code") == "pairing/runners/abc/res/code"
    assert SCHEME.reply_topic(APP, "pair") == "pairing/apps/abc/res/pair"
    assert SCHEME.events_topic(APP) == "pairing/apps/abc/events"
    assert SCHEME.status_topic("abc") == "pairing/runners/abc/status"
    scheme = TopicScheme("x/y")
    assert scheme.events_topic(RUNNER) == "x/y/runners/abc/events"


@pytest.mark.parametrize("op", HOSTILE_OPS)
def test_builders_refuse_malformed_ops(op: str) -> None:
    with pytest.raises(ValueError, match="op"):
        SCHEME.reply_topic(RUNNER, op)
    with pytest.raises(ValueError, match="op"):
        SCHEME.request_topic(RUNNER, op)


@pytest.mark.parametrize("runner_id", HOSTILE_IDS)
def test_status_topic_refuses_malformed_ids(runner_id: str) -> None:
    with pytest.raises(ValueError, match="id"):
        SCHEME.status_topic(runner_id)


@given(kinds, valid_ids, valid_ops)
def test_request_topic_round_trip(kind: Kind, ident: str, op: str) -> None:
    identity = Identity(kind, ident)
    parsed = SCHEME.parse_request(SCHEME.request_topic(identity, op))
    assert parsed == RequestTopic(identity, op)
    assert isinstance(parsed, RequestTopic)
    assert parsed.known_op == (op in ops_for(kind))


def test_known_and_unknown_ops() -> None:
    assert SCHEME.parse_request("pairing/apps/abc/req/pair") == RequestTopic(APP, "pair")
    runner_pair = SCHEME.parse_request("pairing/runners/abc/req/pair")
    assert isinstance(runner_pair, RequestTopic)
    assert not runner_pair.known_op  # well-formed but not a runner op: INVALID_REQUEST
    app_heartbeat = SCHEME.parse_request("pairing/apps/abc/req/heartbeat")
    assert isinstance(app_heartbeat, RequestTopic)
    assert not app_heartbeat.known_op


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("other/runners/abc/req/code", "bad_prefix"),
        ("pairingx/runners/abc/req/code", "bad_prefix"),
        ("pairing", "bad_prefix"),
        ("pairing/robots/abc/req/code", "bad_kind"),
        ("pairing/runner/abc/req/code", "bad_kind"),
        ("pairing/runners/abc/res/code", "bad_shape"),
        ("pairing/runners/abc/req", "bad_shape"),
        ("pairing/runners/abc/req/code/x", "bad_shape"),
        ("pairing/runners/abc/status", "bad_shape"),
        ("pairing/runners//req/code", "bad_id"),
        ("pairing/runners/abc/req/", "bad_op"),
    ],
)
def test_drop_reasons(topic: str, reason: str) -> None:
    assert SCHEME.parse_request(topic) == TopicDrop(reason)  # type: ignore[arg-type]


@given(kinds, st.sampled_from(HOSTILE_IDS) | st.text().filter(lambda s: not is_valid_id(s)))
def test_hostile_id_segments_are_dropped(kind: Kind, ident: str) -> None:
    parsed = SCHEME.parse_request(f"pairing/{kind.segment}/{ident}/req/pair")
    assert isinstance(parsed, TopicDrop)


@given(kinds, st.sampled_from(HOSTILE_OPS) | st.text().filter(lambda s: not is_valid_op(s)))
def test_hostile_op_segments_are_dropped(kind: Kind, op: str) -> None:
    parsed = SCHEME.parse_request(f"pairing/{kind.segment}/abc/req/{op}")
    assert isinstance(parsed, TopicDrop)


topics = st.tuples(
    st.sampled_from(["pairing", "pairing/x", "other", ""]),
    st.sampled_from(["runners", "apps", "runner", "", "+"]),
    valid_ids | st.sampled_from(HOSTILE_IDS),
    st.sampled_from(["req", "res", "status", ""]),
    valid_ops | st.sampled_from(HOSTILE_OPS),
    st.sampled_from([[], ["x"], [""]]),
).map(lambda parts: "/".join([*parts[:5], *parts[5]]))


@given(topics)
def test_parse_request_accepts_only_well_formed_topics(topic: str) -> None:
    parsed = SCHEME.parse_request(topic)
    if isinstance(parsed, RequestTopic):
        assert SCHEME.request_topic(parsed.identity, parsed.op) == topic
        assert is_valid_id(parsed.identity.id)
        assert is_valid_op(parsed.op)
    else:
        assert parsed.reason in {"bad_prefix", "bad_kind", "bad_id", "bad_op", "bad_shape"}


def test_parse_status() -> None:
    assert SCHEME.parse_status("pairing/runners/abc/status") == "abc"
    assert TopicScheme("a/b").parse_status("a/b/runners/r-1/status") == "r-1"
    for topic in [
        "pairing/apps/abc/status",
        "pairing/runners/status",
        "pairing/runners//status",
        "pairing/runners/a/b/status",
        "pairing/runners/abc/status/x",
        "pairing/runners/abc\n/status",
        "other/runners/abc/status",
        "pairing/runners/+/status",
    ]:
        assert SCHEME.parse_status(topic) is None, topic


@given(valid_ids)
def test_parse_status_round_trip(runner_id: str) -> None:
    assert SCHEME.parse_status(SCHEME.status_topic(runner_id)) == runner_id


@pytest.mark.parametrize(
    "response_topic",
    [
        "pairing/runners/abc/res",  # the level itself: `res/#` matches it
        "pairing/runners/abc/res/code",
        "pairing/runners/abc/res/inbox",
        "pairing/runners/abc/res/a/b/c",
        "pairing/runners/abc/res/",  # an empty level under res
        "pairing/runners/abc/res//x",
        "pairing/runners/abc/res/é",
        "pairing/runners/abc/res/req/code",  # under res, whatever the level is called
    ],
)
def test_response_topic_under_own_res_is_accepted(response_topic: str) -> None:
    assert SCHEME.accept_response_topic(RUNNER, response_topic)


@pytest.mark.parametrize(
    "response_topic",
    [
        None,
        "",
        "pairing/runners/abc",  # the subtree root itself
        "pairing/runners/abc/",
        "pairing/runners/abc/inbox",  # own subtree, but outside res/ (the ACL drops it)
        "pairing/runners/abc/inbox/1",
        "pairing/runners/abc/events",
        "pairing/runners/abc/status",
        "pairing/runners/abc/status/x",
        "pairing/runners/abc/results",  # `res` only as a whole level
        "pairing/runners/abc/resx/1",
        "pairing/runners/abc/req",
        "pairing/runners/abc/req/code",
        "pairing/runners/abc/res/+",
        "pairing/runners/abc/res/#",
        "pairing/runners/abc/res/a+b",
        "pairing/runners/abc/res/x\x00",
        "pairing/runners/abc/res/\ud800",  # not encodable as UTF-8
        "pairing/runners/abc/res/" + "x" * 65535,  # too long
        "pairing/runners/other/res/code",
        "pairing/runners/abc2/res/x",  # prefix sibling
        "pairing/runners/ab/res/x",
        "pairing/apps/abc/res/x",  # same id, other kind
        "other/runners/abc/res/x",
        "$share/g/pairing/runners/abc/res/x",
        "/pairing/runners/abc/res/x",
    ],
)
def test_response_topic_elsewhere_is_refused(response_topic: str | None) -> None:
    assert not SCHEME.accept_response_topic(RUNNER, response_topic)


def test_response_topic_length_bound_is_in_bytes() -> None:
    base = "pairing/apps/abc/res/"
    assert SCHEME.accept_response_topic(APP, base + "x" * (65535 - len(base)))
    assert not SCHEME.accept_response_topic(APP, base + "x" * (65536 - len(base)))
    assert not SCHEME.accept_response_topic(APP, base + "é" * ((65535 - len(base)) // 2 + 1))


def test_response_topic_rule_for_apps() -> None:
    assert SCHEME.accept_response_topic(APP, "pairing/apps/abc/res/replies/1")
    assert not SCHEME.accept_response_topic(APP, "pairing/apps/abc/replies/1")
    assert not SCHEME.accept_response_topic(APP, "pairing/apps/abc/req/pair")
    assert not SCHEME.accept_response_topic(APP, "pairing/runners/abc/res/x")


_levels = st.sampled_from(
    ["pairing", "runners", "apps", "abc", "abd", "res", "req", "events", "x", "", "+", "#"]
) | st.text(st.characters(codec="utf-8", exclude_characters="/"), max_size=4)


@given(
    identity=st.builds(Identity, kinds, st.sampled_from(["abc", "abd", "x"])),
    levels=st.lists(_levels, max_size=7),
    own_res=st.booleans(),
)
def test_response_topic_rule_is_the_acl_filter(
    identity: Identity, levels: list[str], own_res: bool
) -> None:
    """Accepted exactly when the shipped ACL's filter `P/<kind>s/<id>/res/#` matches the
    topic and the topic is a valid topic name (no wildcard, no NUL): what the service may
    write and the requester may read (broker-config/*.acl), so every reply sent to an
    accepted Response Topic is delivered."""
    base = ["pairing", identity.kind.segment, identity.id, "res"] if own_res else []
    topic = "/".join(base + levels)
    acl_filter = f"pairing/{identity.kind.segment}/{identity.id}/res/#"
    valid_name = not any(c in topic for c in "+#\x00")
    deliverable = valid_name and bool(topic) and topic_matches_sub(acl_filter, topic)
    assert SCHEME.accept_response_topic(identity, topic) == deliverable
