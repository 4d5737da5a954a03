"""What the store leaves behind after a full flow: TTLs and no live code
(docs/design.md "Redis keys")."""

from __future__ import annotations

import re

from mqtt_pairing.codes import normalise_code
from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.redis_store import SESSION_KEYS_MARGIN_S
from mqtt_pairing.tombstones import KEEP_MARGIN_MS
from tests.store.helpers import Api, all_keys, dump_key, full_flow

# docs/design.md: every key has a TTL except the limit hash of an identity under a permanent
# ban or on the allowlist, the budget shards, the expiry sets, the outbox and its due marks
# (each bounded by what live sessions or in-flight outboxes put there), and the global
# history shards (trimmed by count as written, by age by the sweep).
_NO_TTL_FAMILIES = re.compile(r":(budget|expiry|outbox|outbox-due):\{|:history:\{global:")


async def _exempt(store: PairingStore, key: str) -> bool:
    if _NO_TTL_FAMILIES.search(key):
        return True
    if re.search(r":limit:\{[^}]*\}$", key):
        ban_until, allow = await store.client.hmget(key, ["ban_until_ms", "allow"])
        return ban_until == "-1" or allow == "1"
    return False


async def test_every_key_has_a_ttl_except_those_design_exempts(
    api: Api, store: PairingStore, prefix: str
) -> None:
    await full_flow(api)
    keys = await all_keys(store.client, prefix)
    families = {
        # a code's key carries its digest after its group's tag
        re.sub(r"^code:\{\}:[0-9a-f]{24}", "code:{}", re.sub(r"\{[^}]*\}", "{}", k))
        for k in (k.removeprefix(prefix + ":") for k in keys)
    }
    # the flow left every kind of key the pair flow writes
    assert {
        "code:{}",
        "code:{}:claims",
        "runner:{}",
        "runner:{}:sessions",
        "app:{}:sessions",
        "session:{}",
        "limit:{}",
        "budget:{}",
    } <= families
    # ban, allowlist, penalty and the request and failure logs share the limit hash
    assert not {"limit:{}:fail", "limit:{}:req", "ban:{}", "allow:{}"} & families
    assert any(k.startswith(f"{prefix}:dedupe:") for k in keys)
    without_ttl = []
    for key in keys:
        pttl = await store.client.pttl(key)
        if pttl == -2:  # expired meanwhile
            continue
        if pttl < 0 and not await _exempt(store, key):
            without_ttl.append(key)
    assert without_ttl == []
    # and the exempt ones are what docs/design.md says
    assert await store.client.pttl(store.keys.limit("app", "banned-for-good")) == -1
    assert await store.client.pttl(store.keys.limit("runner", "r-banned-for-good")) == -1
    assert await store.client.pttl(store.keys.limit("app", "vip")) == -1
    # a ban of an hour keeps the hash an hour
    assert await store.client.pttl(store.keys.limit("app", "banned-for-a-while")) > 3_500_000


async def _pttl_after_flow(api: Api, store: PairingStore, key: str) -> int:
    await full_flow(api)
    assert await store.client.exists(key)
    return int(await store.client.pttl(key))


async def test_the_global_history_stream_has_no_ttl_and_is_trimmed_by_age(
    api: Api, store: PairingStore
) -> None:
    # docs/design.md "History": trimmed by count as written and by age by the sweep
    # (tests/store/test_history_append.py), so it needs no TTL, and none is refreshed.
    assert await _pttl_after_flow(api, store, store.keys.history_global(0)) == -1


async def test_the_outbox_due_set_is_emptied_by_the_acknowledgement(
    api: Api, store: PairingStore
) -> None:
    # No TTL (none is refreshed on the request path): each mark is removed by whoever
    # delivers the outbox, so the set holds only outboxes in flight.
    assert await _pttl_after_flow(api, store, store.keys.outbox_due(0)) == -1
    for runner_id in await store.client.zrange(store.keys.outbox_due(0), 0, -1):
        entries = await store.read_outbox(runner_id)
        await store.ack_outbox(runner_id, [e.stream_id for e in entries], shards=1, lease_s=5)
    assert not await store.client.exists(store.keys.outbox_due(0))


async def test_key_ttls_are_bounded_by_their_settings(
    api: Api, store: PairingStore, prefix: str
) -> None:
    await full_flow(api)
    s = api.settings
    bounds_s = {
        "dedupe": s.pairing_dedupe_ttl_s,
        "code": s.pairing_code_ttl_max_s,
        # a tombstone string outlives the last expiry in its window by the tombstone time
        "tomb": s.pairing_code_ttl_max_s
        + s.pairing_code_tombstone_s
        + (s.tombstones.window_ms + KEEP_MARGIN_MS) // 1000,
        # a session's keys outlive its idle deadline by a margin; the runner hash also
        # outlives its code
        "runner": max(s.pairing_session_idle_ttl_s, s.pairing_code_ttl_max_s)
        + SESSION_KEYS_MARGIN_S,
        "app": s.pairing_session_idle_ttl_s + SESSION_KEYS_MARGIN_S,
        "session": s.pairing_session_idle_ttl_s + SESSION_KEYS_MARGIN_S,
        "history": s.pairing_history_retention_s,
        "budget": s.pairing_global_fail_window_s,
        "limit": s.pairing_penalty_max_s + s.pairing_penalty_memory_s,
        "ban": 3600,
    }
    for key in await all_keys(store.client, prefix):
        family = key.removeprefix(prefix + ":").split(":", 1)[0]
        pttl = await store.client.pttl(key)
        if family in bounds_s and pttl > 0:
            assert pttl <= bounds_s[family] * 1000, key


async def test_no_key_name_or_value_holds_a_code(
    api: Api, store: PairingStore, prefix: str
) -> None:
    codes = await full_flow(api)
    assert len(codes) == len(set(codes)) == 6
    # at least one of them is still live
    live = [c for c in codes if (await api.code_hash(c)).get("state") == "active"]
    assert live
    dumps = {
        k: (await dump_key(store.client, k)).upper() for k in await all_keys(store.client, prefix)
    }
    assert dumps
    leaks: list[tuple[str, str]] = []
    for code in codes:
        plain = normalise_code(code)
        forms = {code, plain, "-".join((plain[:3], plain[3:6], plain[6:]))}
        leaks.extend(
            (f"{plain[0]}**-***-***", key)
            for key, dump in dumps.items()
            if any(form.upper() in dump for form in forms)
        )
    assert leaks == []
