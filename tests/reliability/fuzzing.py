"""Hypothesis strategies and oracles of the fuzz tests (docs/protocol.md is the oracle).

- Topics: well-formed request topics, and hostile shapes (bad kinds, ids, ops, levels,
  Unicode, control characters); `request_topic_oracle` says which ones are requests.
- Payloads: mostly what breaks early (not UTF-8, not JSON, not an object, duplicate keys,
  NaN, too deep, too large, wrong field types), some well-formed requests that reach
  Redis; codes and session ids can come from a pool the test fills with live ones.
- `expected_request_id`: what a reply's `request_id` must be for a payload.
- `check_envelope`: a reply is a well-formed envelope of docs/protocol.md.
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import strategies as st

from mqtt_pairing.errors import PairingErrorCode
from mqtt_pairing.topics import APP_OPS, RUNNER_OPS

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
OP_RE = re.compile(r"[a-z][a-z-]{0,31}")
RID_RE = re.compile(r"[\x21-\x7e]{1,64}")
MAX_PAYLOAD_BYTES = 4096
ERROR_CODES = frozenset(code.value for code in PairingErrorCode)
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

KNOWN_OPS = ["pair", "code", "sessions", "status", "unpair", "heartbeat", "cancel-code", "message"]
"""Every op (Hypothesis draws the first ones more often)."""
assert set(KNOWN_OPS) == RUNNER_OPS | APP_OPS
FEW_IDS = ["r1", "r2", "a1", "a2", "x.y-z_0"]
"""A few ids that come back often, so that requests interact (codes, sessions, limits)."""

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
valid_ids = st.one_of(
    st.sampled_from(FEW_IDS),
    st.builds(
        lambda first, rest: first + rest,
        st.sampled_from(_ALNUM),
        st.text(alphabet=_ALNUM + "._-", max_size=63),
    ),
)
valid_ops = st.one_of(
    st.sampled_from(KNOWN_OPS),
    st.builds(
        lambda first, rest: first + rest,
        st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", max_size=31),
    ),
)
level_text = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/"), min_size=0, max_size=70
)
HOSTILE_LEVELS = [
    "",
    "-a",
    ".a",
    "_a",
    "a b",
    "a\n",
    "\na",
    "é",
    "\uff411",
    "a" * 65,
    "A" * 64 + "\u200b",
    "..",
    ".",
    "+",
    "#",
    "$SYS",
    "\x00",
    "a\x00",
    "PAIR",
    "pair ",
    "p" * 33,
    "req",
    "res",
    "\u202e",
    "\ud7ff",
]
hostile_levels = st.one_of(st.sampled_from(HOSTILE_LEVELS), level_text)


def topics(prefix: str) -> st.SearchStrategy[str]:
    """Request topics under `prefix`, well-formed or not (and topics of other shapes)."""
    kinds = st.sampled_from(["runners", "apps"])
    well_formed = st.builds(
        lambda kind, ident, op: f"{prefix}/{kind}/{ident}/req/{op}", kinds, valid_ids, valid_ops
    )
    bad_level = st.builds(
        lambda kind, ident, mid, op: f"{prefix}/{kind}/{ident}/{mid}/{op}",
        st.one_of(kinds, st.sampled_from(["runner", "app", "Apps", "status", ""]), level_text),
        st.one_of(valid_ids, hostile_levels),
        st.one_of(st.just("req"), st.sampled_from(["res", "REQ", "", "events"]), level_text),
        st.one_of(valid_ops, hostile_levels),
    )
    other_shapes = st.builds(
        lambda levels: "/".join([prefix, *levels]),
        st.lists(
            st.one_of(hostile_levels, st.sampled_from(["apps", "runners", "req"])), max_size=7
        ),
    )
    raw = st.text(max_size=80)
    return st.one_of(well_formed, well_formed, bad_level, bad_level, other_shapes, raw)


def request_topic_oracle(prefix: str, topic: str) -> tuple[str, str, str] | None:
    """(kind, id, op) when `topic` is a request topic by docs/protocol.md, else None."""
    head = f"{prefix}/"
    if not topic.startswith(head):
        return None
    parts = topic[len(head) :].split("/")
    if len(parts) != 4 or parts[2] != "req" or parts[0] not in ("runners", "apps"):
        return None
    kind, ident, _, op = parts
    if not ID_RE.fullmatch(ident) or not OP_RE.fullmatch(op):
        return None
    return kind.removesuffix("s"), ident, op


# ---- payloads ---------------------------------------------------------------------------

# Values are mostly picked from lists of interesting ones (right, boundary and wrong):
# one draw each, which keeps 10,000 items within seconds; texts and numbers are drawn too.
SCALARS: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, -(2**70), 10**30,
    0.5, -0.0, 1e308, 5e-324, "", "x", "é", "\u202e", "\x00", "\ud7ff", "0" * 40,
]  # fmt: skip
json_scalars = st.one_of(
    st.sampled_from(SCALARS),
    st.integers(min_value=-(2**31), max_value=2**31),
    st.text(max_size=12),
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=3),
    st.sampled_from([[], {}, [[[]]], {"a": {"b": {"c": None}}}, {"": []}, [None] * 5]),
)
printable = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
RIDS = ["p1", "p2", "c1", "s-1", "x" * 64, "{tag}", "a\\b", '"', "~", "!#$%&'()*+,-./:;<=>?@"]
BAD_RIDS: list[Any] = ["", "a b", "x" * 65, "é", "a\n", "\t", "ab\x7f", 5, None, True, 1.5, []]
request_ids = st.one_of(
    st.sampled_from(RIDS),
    st.text(alphabet=printable, min_size=1, max_size=16),
    st.sampled_from(BAD_RIDS),
)
CODES: list[Any] = [
    "000-000-000", "0000000000", "00000000", "7kq m2x 9pz", "7KQ\u2010M2X\u20109PZ",
    "\uff17\uff2b\uff31-M2X-9PZ", "U00-000-000", "7KQ_M2X.9PZ", "7kq\u00adm2x\u200b9pz",
    "oil-OIL-oil", "", " ", 5, None, ["7KQ-M2X-9PZ"], {"code": "x"}, "7KQ-M2X-9PZ" * 50,
]  # fmt: skip
code_texts = st.one_of(
    st.sampled_from(CODES),
    st.text(alphabet=CROCKFORD + "-oOiIlLuU .\u2010\u00a0\u200b\uff11", max_size=14),
)
INTS: list[Any] = [
    1, 10, 11, 59, 60, 600, 86_400, 86_401, 0, -1, 2**63, 1.0, 5.5, True, "5", None, [],
]  # fmt: skip
ints = st.one_of(st.sampled_from(INTS), st.integers(min_value=-5, max_value=100_000))
NAMES: list[Any] = [
    "runner", "n" * 64, "n" * 65, "a\x07b", "a\u202eb", "x\u200by", "\ufeff", "", "名前",
    5, None, {},
]  # fmt: skip
names = st.one_of(st.sampled_from(NAMES), st.text(max_size=10))
METADATA: list[Any] = [
    {}, {"k": "v"}, {"k": "v" * 1100}, {"k": "v" * 1000}, {"a": {"b": [1, 2.5, None]}},
    {"é": "\u202e"}, [], "x", None, 5,
]  # fmt: skip
metadata = st.sampled_from(METADATA)
public_keys = st.one_of(
    st.sampled_from(["", "k" * 512, "k" * 513, "-----BEGIN KEY-----", 5, None]),
    st.text(max_size=10),
)
SESSIONS: list[Any] = ["s", "x" * 64, "x" * 65, "", "a b", 5, None, "é"]


def from_pool(pool: list[str], fallback: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """An item of `pool` (a list the test fills as it goes), or `fallback` while it is empty.

    The draws have the same shape whatever the pool holds, so that Hypothesis can replay
    an example (its values may differ: the pool is state).
    """
    return st.tuples(st.integers(min_value=0, max_value=2**16), fallback).map(
        lambda pair: pool[pair[0] % len(pool)] if pool else pair[1]
    )


_NINE_IN_TEN = [True] * 9 + [False]


@st.composite
def _mostly(draw: st.DrawFn, right: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> Any:
    """Nine times in ten a value of `right`, else one of `wrong`."""
    return draw(right) if draw(st.sampled_from(_NINE_IN_TEN)) else draw(wrong)


@st.composite
def _object(
    draw: st.DrawFn,
    values: dict[str, st.SearchStrategy[Any]],
    required: tuple[str, ...],
    optional: tuple[str, ...],
) -> dict[str, Any]:
    """The required fields and a drawn subset of the optional ones (a bit mask: one draw)."""
    mask = draw(st.integers(min_value=0, max_value=2 ** len(optional) - 1)) if optional else 0
    names = [*required, *(name for i, name in enumerate(optional) if mask >> i & 1)]
    return {name: draw(values[name]) for name in names}


KEYS = [
    "request_id", "code", "ttl_s", "max_uses", "runner_name", "app_name", "metadata",
    "public_key", "session_id", "app_id", "all", "state", "data", "", "REQUEST_ID", "request_id ",
    "\u0000", "__proto__",
]  # fmt: skip


@st.composite
def _any_object(draw: st.DrawFn) -> dict[str, Any]:
    """An object of up to four keys (request field names or not) and any values."""
    size = draw(st.integers(min_value=0, max_value=4))
    keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
    return {draw(keys): draw(json_values) for _ in range(size)}


TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "pair": (("request_id", "code"), ("app_name", "metadata", "public_key", "extra")),
    "code": (
        ("request_id",),
        ("ttl_s", "max_uses", "runner_name", "metadata", "public_key", "extra"),
    ),
    "app-unpair": (("request_id", "session_id"), ("extra",)),
    "runner-unpair": (("request_id",), ("session_id", "app_id", "all")),
    "simple": (("request_id",), ("extra",)),
    "heartbeat": ((), ("request_id", "extra")),
    "status": (("state",), ("request_id",)),
    "message": (("request_id", "session_id", "data"), ("extra",)),
}
"""op kind -> (required fields, optional fields) of its request objects."""


def op_templates(
    codes: list[str], session_ids: list[str]
) -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    """Objects shaped like each op's request, fields right or (sometimes) wrong; "any":
    objects of any shape. Codes and session ids come from the pools (live ones) when the
    test has some."""
    values: dict[str, st.SearchStrategy[Any]] = {
        # Mostly fresh request ids; the others repeat, for replays and mismatches.
        "request_id": _mostly(st.uuids().map(str), request_ids),
        "code": _mostly(from_pool(codes, st.just("000-000-000")), code_texts),
        "ttl_s": _mostly(st.integers(min_value=60, max_value=86_400), ints),
        "max_uses": _mostly(st.integers(min_value=1, max_value=10), ints),
        "runner_name": _mostly(st.sampled_from(["r", "runner one", "名前"]), names),
        "app_name": _mostly(st.sampled_from(["a", "phone", "名前"]), names),
        "metadata": _mostly(st.sampled_from([{}, {"os": "ios", "v": [1, 2]}]), metadata),
        "public_key": _mostly(st.sampled_from(["", "pk-1", "k" * 512]), public_keys),
        "session_id": _mostly(from_pool(session_ids, st.just("s")), st.sampled_from(SESSIONS)),
        "app_id": _mostly(st.sampled_from(FEW_IDS), st.one_of(valid_ids, json_scalars)),
        "all": _mostly(st.just(True), st.sampled_from([False, 1, "true", None])),
        "data": _mostly(st.sampled_from([{}, {"type": "sas.nonce", "nonce": "x"}]), metadata),
        "state": _mostly(st.sampled_from(["online", "offline"]), json_scalars),
        "extra": json_values,
    }
    out = {
        name: _object(values, required, optional)
        for name, (required, optional) in TEMPLATES.items()
    }
    out["any"] = _any_object()
    return out


OP_TEMPLATE = {
    ("runners", "code"): "code",
    ("runners", "cancel-code"): "simple",
    ("runners", "sessions"): "simple",
    ("runners", "unpair"): "runner-unpair",
    ("runners", "heartbeat"): "heartbeat",
    ("apps", "pair"): "pair",
    ("apps", "sessions"): "simple",
    ("apps", "unpair"): "app-unpair",
    ("apps", "status"): "simple",
    ("runners", "message"): "message",
    ("apps", "message"): "message",
}
OP_WEIGHTS = [
    *[("apps", "pair")] * 3,
    *[("runners", "code")] * 2,
    *[op for op in OP_TEMPLATE if op not in (("runners", "code"), ("apps", "pair"))],
]
"""Pairs and codes more often than the other ops (pairs first: Hypothesis draws the first
choice more often than the others)."""


def request_objects(codes: list[str], session_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects shaped like any op's request (or like none)."""
    templates = op_templates(codes, session_ids)
    names = sorted(templates)

    @st.composite
    def one(draw: st.DrawFn) -> dict[str, Any]:
        return draw(templates[draw(st.sampled_from(names))])

    return one()


def requests(prefix: str, codes: list[str], session_ids: list[str]) -> st.SearchStrategy[Any]:
    """(topic, payload) of a well-formed request, its payload shaped for its op, rarely damaged.

    These reach the store (codes, pairs, unpairs, replays), where random input would not.
    """
    templates = op_templates(codes, session_ids)
    per_op = {
        (segment, op): _payloads(templates[name], LIGHT_DAMAGE)
        for (segment, op), name in OP_TEMPLATE.items()
    }
    ids = st.sampled_from([*FEW_IDS, *FEW_IDS, "other"])
    other_ids = valid_ids

    @st.composite
    def one(draw: st.DrawFn) -> Any:
        segment, op = draw(st.sampled_from(OP_WEIGHTS))
        ident = draw(ids)
        if ident == "other":
            ident = draw(other_ids)
        return f"{prefix}/{segment}/{ident}/req/{op}", draw(per_op[(segment, op)])

    return one()


def _position(draw: st.DrawFn, length: int) -> int:
    """A position in 0..length, drawn the same way whatever the length (the length may
    depend on the pools, which are state: Hypothesis wants the same draws on a replay)."""
    return draw(st.integers(min_value=0, max_value=1000)) * length // 1000


def _deep(depth: int, inner: str) -> str:
    return '{"x":' * depth + inner + "}" * depth


DAMAGE = [
    "object",
    "object",
    "object",
    "object",
    "binary",
    "text",
    "not_object",
    "duplicate",
    "truncated",
    "spliced",
    "deep",
    "large",
    "nan",
    "bad_utf8",
]
"""How a payload is made: a plain object (most often), or damaged one way or another."""
LIGHT_DAMAGE = [*["object"] * 12, "duplicate", "truncated", "spliced", "deep", "large", "nan"]


def payloads(codes: list[str], session_ids: list[str]) -> st.SearchStrategy[bytes]:
    """Raw payload bytes; codes and session ids come from the pools (filled by the test)."""
    return _payloads(request_objects(codes, session_ids), DAMAGE)


@st.composite
def _payloads(
    draw: st.DrawFn, objects: st.SearchStrategy[dict[str, Any]], damage: list[str]
) -> bytes:
    how = draw(st.sampled_from(damage))
    if how == "binary":
        return draw(st.binary(max_size=300))
    if how == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    if how == "not_object":
        return json.dumps(draw(json_values)).encode()
    obj = draw(objects)
    text = json.dumps(obj, ensure_ascii=draw(st.booleans()))
    if how == "duplicate":
        key = draw(st.sampled_from(["request_id", "code", "session_id", "x"]))
        return ("{" + json.dumps(key) + ":1," + text[1:]).replace(":1,}", ":1}").encode()
    if how == "truncated":
        return text.encode()[: _position(draw, len(text))]
    if how == "spliced":
        at = _position(draw, len(text))
        junk = draw(st.text(max_size=8))
        return (text[:at] + junk + text[at:]).encode("utf-8", "surrogatepass")
    if how == "deep":
        depth = draw(st.integers(min_value=25, max_value=2000))
        inner = text if draw(st.booleans()) else "1"
        return (
            "{" + text[1:-1] + (", " if len(obj) else "") + '"deep":' + _deep(depth, inner) + "}"
        ).encode()
    if how == "large":
        size = draw(st.integers(min_value=MAX_PAYLOAD_BYTES - 64, max_value=MAX_PAYLOAD_BYTES + 64))
        padded = dict(obj, pad="")
        base = len(json.dumps(padded).encode())
        padded["pad"] = "x" * max(0, size - base)
        return json.dumps(padded).encode()
    if how == "nan":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
        return ("{" + text[1:-1] + (", " if len(obj) else "") + '"n":' + constant + "}").encode()
    if how == "bad_utf8":
        raw = text.encode()
        at = _position(draw, len(raw))
        return (
            raw[:at]
            + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))
            + raw[at:]
        )
    return text.encode()


# ---- oracles ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def decode_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a trustworthy JSON object (docs/protocol.md "Payloads"), else None.

    Not trusted: more than 4096 bytes, not UTF-8, not JSON, duplicate keys anywhere, not an
    object. NaN, depth and lone surrogates make a request invalid but leave it trusted.
    """
    if len(payload) > MAX_PAYLOAD_BYTES:
        return None
    try:
        value = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def expected_request_id(payload: bytes) -> str | None:
    """The `request_id` a reply to `payload` must carry (None: null)."""
    obj = decode_object(payload)
    if obj is None:
        return None
    rid = obj.get("request_id")
    if isinstance(rid, str) and RID_RE.fullmatch(rid):
        return rid
    return None


def check_envelope(reply: Any) -> None:
    """Assert that `reply` is a reply envelope of docs/protocol.md, serialisable as strict JSON."""
    assert isinstance(reply, dict), reply
    json.dumps(reply, allow_nan=False)
    rid = reply.get("request_id")
    assert rid is None or (isinstance(rid, str) and RID_RE.fullmatch(rid)), reply
    assert reply.get("ok") in (True, False), reply
    if reply["ok"]:
        assert set(reply) == {"request_id", "ok", "result"}, reply
        assert isinstance(reply["result"], dict), reply
        return
    assert set(reply) == {"request_id", "ok", "error"}, reply
    error = reply["error"]
    assert isinstance(error, dict), reply
    assert set(error) <= {"code", "message", "retry_after_s"}, reply
    assert error["code"] in ERROR_CODES, reply
    assert isinstance(error["message"], str), reply
    assert error["message"], reply
    if "retry_after_s" in error:
        retry = error["retry_after_s"]
        assert isinstance(retry, int), reply
        assert not isinstance(retry, bool), reply
        assert retry >= 0, reply
