"""The service's MQTT identity: its client id and its shared-subscription group.

docs/security.md, "Client ids" and "The service's request stream": the service's client
id never matches the runner/app id pattern (which is what a runner's or app's client id
is on the shipped listeners), and its share group is derived from `PAIRING_SECRET`
unless `PAIRING_SHARED_GROUP` says otherwise.
"""

from __future__ import annotations

import logging
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from mqtt_pairing.cli.main import app as cli_app
from mqtt_pairing.config import (
    LEGACY_SHARED_GROUP,
    Settings,
    check_service_client_id,
    derive_shared_group,
    load_settings,
    shared_group,
)
from mqtt_pairing.errors import ConfigError
from mqtt_pairing.service import build_service
from mqtt_pairing.topics import ID_PATTERN, is_valid_id

SECRET = b"s" * 40


@given(st.from_regex(ID_PATTERN, fullmatch=True))
def test_a_client_id_a_runner_or_app_could_have_is_refused(client_id: str) -> None:
    with pytest.raises(ConfigError) as refused:
        check_service_client_id(client_id)
    assert str(refused.value).startswith("MQTT_CLIENT_ID: must not look like a runner")


@given(st.text(min_size=1, max_size=64).filter(lambda s: not is_valid_id(s)))
def test_any_other_client_id_is_accepted(client_id: str) -> None:
    check_service_client_id(client_id)


def test_the_default_client_id_is_outside_the_id_pattern() -> None:
    default = Settings().mqtt_client_id
    assert default.startswith("mqtt-pairing:")
    assert not is_valid_id(default)
    check_service_client_id(default)
    assert not is_valid_id(f"{default}:presence")  # the presence connection's id


async def test_build_service_refuses_such_a_client_id_before_connecting_anywhere() -> None:
    settings = load_settings(
        mqtt_url="mqtt://127.0.0.1:9",  # nothing listens: the check must come first
        redis_url="redis://127.0.0.1:9/0",
        pairing_secret=SECRET.decode(),
        mqtt_client_id="mqtt-pairing-host1",  # the old default: an app could take it
    )
    with pytest.raises(ConfigError, match=r"^MQTT_CLIENT_ID: "):
        await build_service(settings)


def test_serve_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_URL", "mqtt://127.0.0.1:9")
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    monkeypatch.setenv("PAIRING_SECRET", SECRET.decode())
    monkeypatch.setenv("MQTT_CLIENT_ID", "svc-1")
    result = CliRunner().invoke(cli_app, ["serve"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: MQTT_CLIENT_ID: must not look like a runner")
    assert len(result.stderr.splitlines()) == 1


def test_the_group_is_derived_from_the_secret_and_unguessable_without_it() -> None:
    group = derive_shared_group(SECRET)
    assert group == derive_shared_group(SECRET)
    assert group != derive_shared_group(b"t" * 40)
    prefix, _, digest = group.rpartition("-")
    assert prefix == "mqtt-pairing"
    assert len(digest) == 32
    assert set(digest) <= set(string.hexdigits.lower())
    assert SECRET.decode() not in group


def test_which_group_the_service_uses(caplog: pytest.LogCaptureFixture) -> None:
    derived = derive_shared_group(SECRET)
    assert shared_group(Settings(), SECRET) == derived
    # A secret generated for this process: the in-memory store, one instance, no group.
    assert shared_group(Settings(), SECRET, secret_generated=True) == ""
    assert shared_group(Settings(pairing_shared_group=""), SECRET) == ""
    long_random = "k3V9q2LmX8zT4wYb7Rn1"
    with caplog.at_level(logging.WARNING, logger="mqtt_pairing.config"):
        assert shared_group(Settings(pairing_shared_group=long_random), SECRET) == long_random
        assert caplog.records == []
        for guessable in (LEGACY_SHARED_GROUP, "workers"):
            assert shared_group(Settings(pairing_shared_group=guessable), SECRET) == guessable
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert all(w.startswith("PAIRING_SHARED_GROUP is short or well known") for w in warnings)


@pytest.mark.parametrize("bad", ["a/b", "a+b", "#", "a\x00"])
def test_a_share_name_mqtt_forbids_is_a_setting_error(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^PAIRING_SHARED_GROUP: must not contain"):
        load_settings(pairing_shared_group=bad)
