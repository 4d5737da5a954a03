"""Simulated peers for trying the service by hand: `runner` and `app ...`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import aiomqtt
import segno
import typer

from mqtt_pairing.cli.common import fail, peer_address, setup_logging
from mqtt_pairing.client import AppClient, PairingClient, ReplyError, RunnerClient
from mqtt_pairing.mqtt_address import BrokerAddress, describe_connect_error
from mqtt_pairing.topics import TopicScheme, is_valid_id

app_cli = typer.Typer(
    help="A simulated app: pair with a code, list and close sessions.", no_args_is_help=True
)

MqttUrl = Annotated[
    str | None,
    typer.Option("--mqtt-url", help="Broker URL (default: $MQTT_URL or mqtt://127.0.0.1:1883)."),
]
Prefix = Annotated[str, typer.Option("--prefix", help="Topic prefix (PAIRING_TOPIC_PREFIX).")]
Protocol = Annotated[
    str, typer.Option("--protocol", help="MQTT version: 5, 3.1.1, or auto (5, else 3.1.1).")
]
AppId = Annotated[str, typer.Option("--id", help="The app's id.")]
CaFile = Annotated[
    str | None,
    typer.Option(
        "--ca-file",
        help="PEM file of the CA that signed the broker's certificate, for mqtts:// and "
        "wss:// (default: $MQTT_CA_FILE, else the system's trust store).",
    ),
]
TlsInsecure = Annotated[
    bool,
    typer.Option(
        "--tls-insecure",
        help="Do not verify the broker's TLS certificate (prints a warning; testing only).",
    ),
]


def _address(mqtt_url: str | None, ca_file: str | None, tls_insecure: bool) -> BrokerAddress:
    setup_logging("WARNING")  # the warning of --tls-insecure, as a log line on stderr
    return peer_address(mqtt_url, ca_file=ca_file, tls_insecure=tls_insecure)


_OFFLINE = json.dumps({"state": "offline"})
"""The runner's Last Will payload (docs/protocol.md "Presence")."""
_GOODBYE_TIMEOUT_S = 5.0
"""How long a stopping runner waits for its `offline` status to be acknowledged."""
_PROBE_TIMEOUT_S = 3.0
"""With `--protocol auto`, how long to wait for the MQTT 5 CONNACK before trying 3.1.1.

amqtt (the embedded broker, MQTT 3.1.1 only) refuses an MQTT 5 CONNECT at once, except
one with a Last Will: it misreads the will properties and waits for bytes that never
come, so without this bound a runner would wait the whole client timeout (10 s).
"""


def _check_id(value: str) -> str:
    if not is_valid_id(value):
        fail("--id: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit", 2)
    return value


async def _connect(
    client_type: type[RunnerClient] | type[AppClient],
    ident: str,
    address: BrokerAddress,
    prefix: str,
    protocol: str,
    **kwargs: Any,  # noqa: ANN401
) -> PairingClient:
    versions: list[Literal["5", "3.1.1"]]
    versions = ["5", "3.1.1"] if protocol == "auto" else [protocol]  # type: ignore[list-item]
    last: Exception | None = None
    loop = asyncio.get_running_loop()
    for i, version in enumerate(versions):
        client = client_type(ident, address, prefix=prefix, protocol=version, **kwargs)
        probing = i < len(versions) - 1
        timeout_s = client.client.timeout
        if probing:
            client.client.timeout = _PROBE_TIMEOUT_S
        started = loop.time()
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            last = exc
            if loop.time() - started >= _PROBE_TIMEOUT_S:
                # Timed out on an open socket: close it, so the broker stops waiting too.
                with contextlib.suppress(Exception):
                    await client.__aexit__(None, None, None)
            continue
        client.client.timeout = timeout_s
        return client
    assert last is not None  # noqa: S101 - at least one version was tried
    return fail(describe_connect_error(last, address))


def _print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def runner(
    runner_id: Annotated[str, typer.Option("--id", help="The runner's id.")],
    name: Annotated[str | None, typer.Option("--name", help="runner_name to show apps.")] = None,
    ttl_s: Annotated[int | None, typer.Option("--ttl", help="Code TTL, seconds.")] = None,
    max_uses: Annotated[int | None, typer.Option("--max-uses", help="Uses per code.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Exit after the first pairing.")] = False,
    qr: Annotated[bool, typer.Option("--qr/--no-qr", help="Print a terminal QR code.")] = True,
    mqtt_url: MqttUrl = None,
    prefix: Prefix = "pairing",
    protocol: Protocol = "auto",
    ca_file: CaFile = None,
    tls_insecure: TlsInsecure = False,
) -> None:
    """Run a simulated runner: print a pairing code (and QR code), then session events.

    The code is renewed when it expires. The runner announces itself as a real one would
    (docs/protocol.md "Presence"): a retained `{"state":"online"}` on its status topic
    and a Last Will `{"state":"offline"}` (retained) that the broker publishes if the
    connection drops; on a clean stop (Ctrl-C, --once) it publishes `offline` itself.
    For example:

        mqtt-pairing runner --id build-01 --name "Build box"
    """
    _check_id(runner_id)
    address = _address(mqtt_url, ca_file, tls_insecure)
    asyncio.run(_runner(runner_id, name, ttl_s, max_uses, once, qr, address, prefix, protocol))


async def _runner(
    runner_id: str,
    name: str | None,
    ttl_s: int | None,
    max_uses: int | None,
    once: bool,
    qr: bool,
    address: BrokerAddress,
    prefix: str,
    protocol: str,
) -> None:
    will = aiomqtt.Will(TopicScheme(prefix).status_topic(runner_id), _OFFLINE, qos=1, retain=True)
    client = await _connect(RunnerClient, runner_id, address, prefix, protocol, will=will)
    assert isinstance(client, RunnerClient)  # noqa: S101
    fields: dict[str, Any] = {}
    if name:
        fields["runner_name"] = name
    if ttl_s is not None:
        fields["ttl_s"] = ttl_s
    if max_uses is not None:
        fields["max_uses"] = max_uses
    try:
        try:
            await client.publish_status("online")
        except aiomqtt.MqttError as exc:
            fail(f"lost the connection to the broker: {exc}")
        typer.echo("presence: online (retained; Last Will: offline)")
        while True:
            try:
                result = await client.request_code(**fields)
            except ReplyError as exc:
                fail(str(exc))
            except TimeoutError:
                fail("no reply from the service (is `mqtt-pairing serve` running on this broker?)")
            except aiomqtt.MqttError as exc:
                fail(f"lost the connection to the broker: {exc}")
            typer.echo(f"pairing code: {result['code']}  (expires {result['expires_at']})")
            typer.echo(f"pairing uri:  {result['pairing_uri']}")
            if qr:
                segno.make(result["pairing_uri"], error="m").terminal(compact=True)
            expires = datetime.fromisoformat(result["expires_at"].replace("Z", "+00:00"))
            wait_s = max(1.0, (expires - datetime.now(UTC)).total_seconds())
            deadline = asyncio.get_running_loop().time() + wait_s
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    event = await client.next_event(timeout_s=left)
                except TimeoutError:
                    break
                _print_json(event)
                if once and event.get("event") == "session.opened":
                    return
            typer.echo("code expired; asking for a new one")
    finally:
        # A clean stop says so; the Last Will covers every other way of going away.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.publish_status("offline"), _GOODBYE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)


@app_cli.command("pair")
def app_pair(
    code: Annotated[str, typer.Argument(help="The code the runner shows, e.g. 7KQ-M2X-9PZ.")],
    app_id: AppId,
    name: Annotated[str | None, typer.Option("--name", help="app_name to show.")] = None,
    mqtt_url: MqttUrl = None,
    prefix: Prefix = "pairing",
    protocol: Protocol = "auto",
    ca_file: CaFile = None,
    tls_insecure: TlsInsecure = False,
) -> None:
    """Pair with a runner's code and print the session (exit 1 with the error code).

    For example:

        mqtt-pairing app pair 7KQ-M2X-9PZ --id phone-1 --name "My phone"
    """
    _check_id(app_id)
    fields = {"app_name": name} if name else {}
    address = _address(mqtt_url, ca_file, tls_insecure)
    asyncio.run(_app_call(app_id, "pair", {"code": code, **fields}, address, prefix, protocol))


@app_cli.command("sessions")
def app_sessions(
    app_id: AppId,
    mqtt_url: MqttUrl = None,
    prefix: Prefix = "pairing",
    protocol: Protocol = "auto",
    ca_file: CaFile = None,
    tls_insecure: TlsInsecure = False,
) -> None:
    """List the app's active sessions."""
    _check_id(app_id)
    address = _address(mqtt_url, ca_file, tls_insecure)
    asyncio.run(_app_call(app_id, "sessions", {}, address, prefix, protocol))


@app_cli.command("unpair")
def app_unpair(
    session_id: Annotated[str, typer.Argument(help="The session to close.")],
    app_id: AppId,
    mqtt_url: MqttUrl = None,
    prefix: Prefix = "pairing",
    protocol: Protocol = "auto",
    ca_file: CaFile = None,
    tls_insecure: TlsInsecure = False,
) -> None:
    """Close one of the app's sessions."""
    _check_id(app_id)
    address = _address(mqtt_url, ca_file, tls_insecure)
    asyncio.run(_app_call(app_id, "unpair", {"session_id": session_id}, address, prefix, protocol))


@app_cli.command("status")
def app_status(
    app_id: AppId,
    mqtt_url: MqttUrl = None,
    prefix: Prefix = "pairing",
    protocol: Protocol = "auto",
    ca_file: CaFile = None,
    tls_insecure: TlsInsecure = False,
) -> None:
    """Show the app's paired runners and whether they are online."""
    _check_id(app_id)
    address = _address(mqtt_url, ca_file, tls_insecure)
    asyncio.run(_app_call(app_id, "status", {}, address, prefix, protocol))


async def _app_call(
    app_id: str,
    op: str,
    body: dict[str, Any],
    address: BrokerAddress,
    prefix: str,
    protocol: str,
) -> None:
    client = await _connect(AppClient, app_id, address, prefix, protocol)
    try:
        try:
            result = await client.call(op, body)
        except ReplyError as exc:
            retry = f" (retry after {exc.retry_after_s} s)" if exc.retry_after_s else ""
            fail(f"{exc.code}: {exc.message}{retry}")
        except TimeoutError:
            fail("no reply from the service (is `mqtt-pairing serve` running?)")
        except aiomqtt.MqttError as exc:
            fail(f"lost the connection to the broker: {exc}")
        _print_json(result)
    finally:
        with contextlib.suppress(Exception):
            await client.__aexit__(None, None, None)
