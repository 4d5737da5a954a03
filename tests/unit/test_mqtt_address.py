"""Tests of mqtt_pairing.mqtt_address: MQTT URLs, verified TLS, one-line connect errors.

The connection tests use small local servers (a plain TCP server that hangs up like
Mosquitto does on a TLS ClientHello, a TLS server with a test certificate), so they pin
what the module relies on in aiomqtt 2.5: a failed connect raises `MqttError` whose
``__context__`` is the socket or TLS error. tests/security/test_tls.py does the same
against real Mosquitto TLS listeners.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import ssl
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest
from aiomqtt.exceptions import MqttConnectError
from hypothesis import given
from hypothesis import strategies as st

from mqtt_pairing.errors import ConfigError
from mqtt_pairing.mqtt_address import (
    NODELAY,
    BrokerAddress,
    BrokerUnreachable,
    describe_connect_error,
    open_connection,
)
from tests.security.certs import TestCA

SCHEMES = {
    "mqtt": (1883, "tcp", False),
    "tcp": (1883, "tcp", False),
    "mqtts": (8883, "tcp", True),
    "ssl": (8883, "tcp", True),
    "ws": (80, "websockets", False),
    "wss": (443, "websockets", True),
}


@pytest.mark.parametrize(("scheme", "expected"), SCHEMES.items())
def test_each_scheme_has_its_transport_tls_and_default_port(
    scheme: str, expected: tuple[int, str, bool]
) -> None:
    address = BrokerAddress.from_url(f"{scheme}://broker.example")
    assert (address.port, address.transport, address.tls) == expected
    assert address.websocket_path == ("/mqtt" if expected[1] == "websockets" else None)
    assert BrokerAddress.from_url(f"{scheme.upper()}://broker.example:1234").port == 1234


def test_credentials_in_the_url_win_and_are_percent_decoded() -> None:
    address = BrokerAddress.from_url(
        "mqtts://svc%40x:p%3Aw%2Fd@h:8884", username="env-user", password="env-pw"
    )
    assert (address.username, address.password) == ("svc@x", "p:w/d")
    fallback = BrokerAddress.from_url("mqtt://h", username="env-user", password="env-pw")
    assert (fallback.username, fallback.password) == ("env-user", "env-pw")
    assert BrokerAddress.from_url("wss://h/ws/path").websocket_path == "/ws/path"


def test_the_password_is_not_in_repr_or_where() -> None:
    address = BrokerAddress.from_url("wss://u:hunter2-secret@[::1]:9443/mqtt")
    assert "hunter2-secret" not in repr(address)
    assert address.where == "wss://[::1]:9443/mqtt"
    assert "u" not in address.where.split("//")[1].split(":")[0]


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1883",
        "mqtt://",
        "mqtt://:1883",
        "h:1883",
        "mqtt://h:99999",
        "mqtt://h:port",
        "mqtt://user:s3cr3t-pw@h:notaport",
        "ftp://user:s3cr3t-pw@h",
    ],
)
def test_a_bad_url_is_one_line_naming_the_setting_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        BrokerAddress.from_url(url, setting="--mqtt-url")
    message = str(refused.value)
    assert message.startswith("--mqtt-url: ")
    assert "\n" not in message
    assert "s3cr3t-pw" not in message


@given(
    scheme=st.sampled_from(sorted(SCHEMES)),
    host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    port=st.integers(1, 65535) | st.none(),
    password=st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
)
def test_parsing_round_trips_and_never_leaks_the_password(
    scheme: str, host: str, port: int | None, password: str
) -> None:
    default_port, transport, tls = SCHEMES[scheme]
    url = f"{scheme}://{host}" + (f":{port}" if port else "")
    secret = f"pw\x01{password}"  # cannot occur in a repr'd field but the password
    address = BrokerAddress.from_url(url, username="u", password=secret)
    assert address.host == host
    assert address.port == (port or default_port)
    assert (address.transport, address.tls) == (transport, tls)
    assert address.password == secret
    assert "pw\\x01" not in repr(address)
    assert secret not in address.where


@pytest.mark.parametrize("url", ["mqtt://h", "ws://h", "tcp://h"])
def test_tls_options_on_a_plain_url_are_refused_not_ignored(url: str, tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    with pytest.raises(ConfigError, match="plain"):
        BrokerAddress.from_url(url, ca_file=str(ca.ca_file))
    with pytest.raises(ConfigError, match="plain"):
        BrokerAddress.from_url(url, tls_insecure=True)
    with pytest.raises(ConfigError, match="plain"):
        BrokerAddress("h", 1883, tls_insecure=True)
    assert BrokerAddress.from_url(url).tls_context() is None


def test_tls_verifies_the_chain_and_the_name_by_default() -> None:
    for url in ("mqtts://h", "wss://h"):
        context = BrokerAddress.from_url(url).tls_context()
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname is True
        assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_a_ca_file_is_trusted(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    address = BrokerAddress.from_url("mqtts://h", ca_file=str(ca.ca_file))
    context = address.tls_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True
    subjects = [dict(x[0] for x in c["subject"]) for c in context.get_ca_certs()]
    assert {"commonName": "mqtt-pairing test CA"} in subjects


def test_an_unreadable_ca_file_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = {
        str(tmp_path / "missing.pem"): "no such file",
        str(garbage): "not a PEM certificate bundle",
    }
    for path, reason in cases.items():
        with pytest.raises(ConfigError) as refused:
            BrokerAddress.from_url("mqtts://h", ca_file=path)
        assert str(refused.value).startswith(f"MQTT_CA_FILE: CA file {path}: {reason}")
        assert "\n" not in str(refused.value)
        with pytest.raises(ConfigError) as named:
            BrokerAddress.from_url("mqtts://h", ca_file=path, ca_setting="--ca-file")
        assert str(named.value).startswith("--ca-file: ")


def test_insecure_turns_verification_off_and_warns_every_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    address = BrokerAddress.from_url("wss://u:pw-xyz@h:8084", tls_insecure=True)
    with caplog.at_level(logging.WARNING, logger="mqtt_pairing.mqtt_address"):
        context = address.tls_context()
        address.tls_context()
    assert context is not None
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "verification is OFF for wss://h:8084/mqtt" in warnings[0]
    assert "pw-xyz" not in warnings[0]


async def test_client_options_make_an_aiomqtt_client(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    address = BrokerAddress.from_url("wss://u:p@h:9/x", ca_file=str(ca.ca_file))
    options = address.client_options()
    assert options["socket_options"] == [NODELAY]
    assert isinstance(options["tls_context"], ssl.SSLContext)
    client = aiomqtt.Client(**options, identifier="x")
    assert client._client._ssl is True  # paho's switch, set by tls_set_context
    plain = aiomqtt.Client(**BrokerAddress("h", 1883).client_options(), identifier="y")
    assert plain._client._ssl is False


# -- Connecting: what aiomqtt raises, and the one line it becomes ----------------------


@contextlib.asynccontextmanager
async def server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A local server on a free port. Plain: hangs up on the first bytes (as Mosquitto
    does on a TLS ClientHello). TLS: completes the handshake, then hangs up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read(1)
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    try:
        yield srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


async def failure(address: BrokerAddress) -> str:
    client = aiomqtt.Client(**address.client_options(), identifier="probe", timeout=5)
    with pytest.raises(BrokerUnreachable) as failed:
        await open_connection(client, address)
    assert isinstance(failed.value, aiomqtt.MqttError)
    assert isinstance(failed.value.__cause__, aiomqtt.MqttError)
    message = str(failed.value)
    assert "\n" not in message
    return message


def tls_server_context(ca: TestCA, hosts: tuple[str, ...]) -> ssl.SSLContext:
    server_cert = ca.issue("server", hosts)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_cert.cert_file, server_cert.key_file)
    return context


@pytest.mark.parametrize("scheme", ["mqtts", "wss"])
async def test_tls_at_a_plain_port_fails_with_one_clear_line(scheme: str) -> None:
    async with server() as port:
        message = await failure(BrokerAddress.from_url(f"{scheme}://u:pw@127.0.0.1:{port}"))
    assert message.startswith(f"TLS handshake with {scheme}://127.0.0.1:{port}")
    assert message.endswith("is that port a TLS listener?")
    assert "pw" not in message.split("?")[0].split("//")[1]


async def test_a_failed_handshake_leaves_no_socket_open() -> None:
    # paho 2.2 drops the socket of a failed handshake unclosed; the context's socket class
    # closes it (mqtt_address._ClosedOnFailedHandshake).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with server() as port:
            for _ in range(3):
                await failure(BrokerAddress.from_url(f"mqtts://127.0.0.1:{port}"))
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_an_untrusted_certificate_fails_with_one_clear_line(tmp_path: Path) -> None:
    ca = TestCA(tmp_path / "ca")
    async with server(tls_server_context(ca, ("127.0.0.1",))) as port:
        message = await failure(BrokerAddress.from_url(f"mqtts://127.0.0.1:{port}"))
    assert message.startswith(f"TLS certificate of mqtts://127.0.0.1:{port} not accepted (")
    assert "unable to get local issuer certificate" in message
    assert "MQTT_CA_FILE / --ca-file" in message


async def test_a_certificate_for_another_name_fails_even_with_the_right_ca(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path / "ca")
    async with server(tls_server_context(ca, ("broker.example",))) as port:
        address = BrokerAddress.from_url(f"mqtts://127.0.0.1:{port}", ca_file=str(ca.ca_file))
        message = await failure(address)
    assert message.startswith(f"TLS certificate of mqtts://127.0.0.1:{port} not accepted (")
    assert "IP address mismatch" in message


async def test_a_closed_port_is_one_line_too() -> None:
    async with server() as port:
        pass  # closed now
    message = await failure(BrokerAddress("127.0.0.1", port))
    assert message == f"connection to mqtt://127.0.0.1:{port} refused (nothing listens there?)"


def test_describe_accepts_the_bare_error_and_connack_refusals() -> None:
    address = BrokerAddress("h", 8883, tls=True)
    bare = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    bare.reason = "WRONG_VERSION_NUMBER"
    assert describe_connect_error(bare, address) == (
        "TLS handshake with mqtts://h:8883 failed (wrong version number): "
        "is that port a TLS listener?"
    )
    refused = MqttConnectError(4)
    assert describe_connect_error(refused, address) == (
        f"the broker at mqtts://h:8883 refused the connection: {refused}"
    )
    lost = aiomqtt.MqttCodeError(7, "Unexpected disconnection")
    assert (
        describe_connect_error(lost, address) == "mqtts://h:8883: [code:7] The connection was lost."
    )
