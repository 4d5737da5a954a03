"""Every script touches keys of one hash tag (docs/design.md "Redis keys", cluster-ready).

The commands are recorded where redis-py packs them, so scripts run one by one, in
pipelines, or reloaded after NOSCRIPT are all seen, whatever store method sent them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection

from mqtt_pairing.store import PairingStore
from mqtt_pairing.store.keys import hash_tag
from mqtt_pairing.store.redis_store import SCRIPT_NAMES
from mqtt_pairing.topics import Kind
from tests.store.helpers import TAG_PATTERN, Api, full_flow

# Scripts that no op of the Dispatcher runs: runner presence, the outbox relay, the expiry
# sweep and leases (tests/cluster/test_slots.py runs them all, on the cluster).
NOT_RUN_BY_DISPATCHER_OPS = frozenset(
    {
        "record_status",
        "expire_session",
        "ack_outbox",
        "claim_due",
        "hold_lease",
        "find_tombstone",
        "mark_due",  # the relay's own marks and the sweep's (a pair's: mark_open)
        "trim_history",  # the sweep's
        # a pair's marks are two ZADDs with its first batch's Redis time; the script only
        # when that time is old (a claim asked again, an open tried again after presence)
        "mark_open",
    }
)
# Scripts that the ops of the Dispatcher run (full_flow must reach every one of them): a
# script added to the store is one of them unless it is listed above.
DISPATCHER_SCRIPTS = frozenset(SCRIPT_NAMES) - NOT_RUN_BY_DISPATCHER_OPS


def _text(arg: Any) -> str:
    return arg.decode() if isinstance(arg, bytes) else str(arg)


@dataclass
class Recorder:
    """Commands sent to Redis: scripts as (name, KEYS), others as their prefixed args."""

    store: PairingStore
    scripts: list[tuple[str, list[str]]] = field(default_factory=list)
    commands: list[tuple[str, list[str]]] = field(default_factory=list)

    def record(self, args: tuple[Any, ...]) -> None:
        words = [_text(a) for a in args]
        command = words[0].upper()
        if command in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
            numkeys = int(words[2])
            self.scripts.append((self._script_name(words[1]), words[3 : 3 + numkeys]))
        else:
            prefix = self.store.keys.prefix + ":"
            self.commands.append((command, [w for w in words[1:] if w.startswith(prefix)]))

    def _script_name(self, sha_or_source: str) -> str:
        for name, script in self.store._scripts.items():
            if sha_or_source in (script.sha, script.script):
                return name
        return f"unknown script {sha_or_source[:12]}"


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch, store: PairingStore) -> Iterator[Recorder]:
    recorder = Recorder(store)
    pack = AbstractConnection.pack_command

    def recording_pack(self: AbstractConnection, *args: Any) -> list[bytes]:
        recorder.record(args)
        return pack(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(AbstractConnection, "pack_command", recording_pack)
        yield recorder


def _assert_one_tag_each(recorder: Recorder) -> None:
    prefix = recorder.store.keys.prefix
    assert recorder.scripts
    cross_slot = [(n, keys) for n, keys in recorder.scripts if len({hash_tag(k) for k in keys}) > 1]
    assert cross_slot == []
    for name, keys in recorder.scripts:
        assert keys, name
        tag = hash_tag(keys[0])
        assert TAG_PATTERN.fullmatch(tag), (name, keys)
        for key in keys:
            assert key.startswith(f"{prefix}:"), (name, key)
            # the tag comes right after the prefix and the kind of key
            assert key.index("{") == key.index(":", len(prefix) + 1) + 1, (name, key)
    # commands sent without a script never mix tags either (pipelines send one by one)
    mixed = [(c, keys) for c, keys in recorder.commands if len({hash_tag(k) for k in keys}) > 1]
    assert mixed == []


async def test_every_script_call_of_a_full_flow_uses_one_hash_tag(
    api: Api, store: PairingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with recording(monkeypatch, store) as recorder:
        await full_flow(api, runner_ops_through_dispatcher=False)
    _assert_one_tag_each(recorder)
    assert set(SCRIPT_NAMES) >= NOT_RUN_BY_DISPATCHER_OPS  # none of them was renamed
    assert {name for name, _keys in recorder.scripts} >= DISPATCHER_SCRIPTS


async def test_a_request_id_with_braces_does_not_move_the_slot(
    api: Api, store: PairingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with recording(monkeypatch, store) as recorder:
        code = await api.code("r1", request_id="{x}")
        assert (await api.pair("a1", code, request_id="}{app:other}{"))["ok"]
    _assert_one_tag_each(recorder)
    assert {hash_tag(keys[0]) for _name, keys in recorder.scripts} >= {"runner:r1", "app:a1"}


async def test_scripts_reloaded_after_a_script_flush_keep_to_one_tag(
    api: Api, store: PairingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = await api.code("r1", max_uses=2)
    await store.client.script_flush()
    with recording(monkeypatch, store) as recorder:
        await api.pair_ok("a1", code)
    _assert_one_tag_each(recorder)


async def test_runner_ops_with_idempotency_use_one_hash_tag(
    api: Api, store: PairingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = await api.code("r1", max_uses=2)
    await api.pair_ok("a1", code)
    with recording(monkeypatch, store) as recorder:
        assert (await api.request(Kind.RUNNER, "r1", "cancel-code"))["ok"]
        assert (await api.request(Kind.RUNNER, "r1", "unpair", all=True))["ok"]
    _assert_one_tag_each(recorder)
