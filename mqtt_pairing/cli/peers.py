"""Simulated peers for trying the service by hand: `runner` and `app ...`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from typing import Annotated, Any

import aiomqtt
import segno
import typer
from pydantic import TypeAdapter

from mqtt_pairing.cli.common import fail, peer_address, setup_logging
from mqtt_pairing.mqtt_address import BrokerAddress, describe_connect_error
from mqtt_pairing.sas import Sas
from mqtt_pairing.sdk import AppClient, ConnectFailed, ReplyError, RunnerClient, SessionOpened
from mqtt_pairing.sdk.peer import Peer
from mqtt_pairing.sdk.wire import Timestamp
from mqtt_pairing.topics import is_valid_id

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


_GOODBYE_TIMEOUT_S = 5.0
"""How long a stopping runner waits for its `offline` status to be acknowledged."""


def _check_id(value: str) -> str:
    if not is_valid_id(value):
        fail("--id: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit", 2)
    return value


async def _connect(
    client_type: type[Peer],
    ident: str,
    address: BrokerAddress,
    prefix: str,
    protocol: str,
    **kwargs: Any,  # noqa: ANN401
) -> Any:  # noqa: ANN401 - the client_type given
    """Open a client of `client_type` (an SDK client or a raw one); one attempt per version.

    With `protocol` "auto", MQTT 5 is tried first (its CONNACK awaited 3 s at most) and
    3.1.1 next (docs/sdk.md, "Connection and TLS").
    """
    client = client_type(
        ident,
        address,
        prefix=prefix,
        protocol=protocol,  # type: ignore[arg-type]
        retry_first_connect=False,
        **kwargs,
    )
    try:
        await client.open()
    except (ConnectFailed, aiomqtt.MqttError) as exc:
        fail(str(exc) if isinstance(exc, ConnectFailed) else describe_connect_error(exc, address))
    return client


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
    # The SDK's runner: a retained `online` status on every connection, a retained Last
    # Will `offline`, `offline` said on a clean stop; a key pair per code for the SAS.
    runner: RunnerClient = await _connect(
        RunnerClient, runner_id, address, prefix, protocol, name=name
    )
    try:
        typer.echo("presence: online (retained; Last Will: offline)")
        while True:
            try:
                code = await runner.request_code(ttl_s=ttl_s, max_uses=max_uses)
            except ReplyError as exc:
                fail(str(exc))
            except TimeoutError:
                fail("no reply from the service (is `mqtt-pairing serve` running on this broker?)")
            typer.echo(f"pairing code: {code.code}  (expires {_ts(code.expires_at)})")
            typer.echo(f"pairing uri:  {code.pairing_uri}")
            if qr:
                segno.make(code.pairing_uri, error="m").terminal(compact=True)
            wait_s = max(1.0, (code.expires_at - datetime.now(UTC)).total_seconds())
            deadline = asyncio.get_running_loop().time() + wait_s
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    event = await runner.next_event(timeout_s=left)
                except TimeoutError:
                    break
                _print_event(event)
                if once and isinstance(event, SessionOpened):
                    return
            typer.echo("code expired; asking for a new one")
    finally:
        # A clean stop says `offline`; the Last Will covers every other way of going away.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(runner.close(), _GOODBYE_TIMEOUT_S)


def _ts(value: datetime) -> str:
    return str(TypeAdapter(Timestamp).dump_python(value, mode="json"))


def _sas(sas: Sas | None) -> dict[str, str] | None:
    return None if sas is None else {"words": str(sas), "digits": sas.digits}


def _print_event(event: Any) -> None:  # noqa: ANN401
    body = event.model_dump(mode="json", exclude_none=False)
    if isinstance(event, SessionOpened):
        body["sas"] = _sas(event.sas)
        body["e2e"] = event.e2e
    _print_json(body)
    if isinstance(event, SessionOpened) and event.sas is not None:
        typer.echo(f"compare with the app: {event.sas}  ({event.sas.digits})")
    elif isinstance(event, SessionOpened) and event.e2e == "failed":
        typer.echo("end-to-end check FAILED (tampering, or no exchange): the session was closed")


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
    app: AppClient = await _connect(AppClient, app_id, address, prefix, protocol)
    try:
        try:
            if op == "pair":
                pairing = await app.pair(body.pop("code"), **body)
                result = {
                    **pairing.model_dump(mode="json"),
                    "sas": _sas(pairing.sas),
                    "e2e": pairing.e2e,
                }
            else:
                result = await app.call(op, body)
        except ReplyError as exc:
            retry = f" (retry after {exc.retry_after_s} s)" if exc.retry_after_s else ""
            fail(f"{exc.code}: {exc.message}{retry}")
        except TimeoutError:
            fail("no reply from the service (is `mqtt-pairing serve` running?)")
        _print_json(result)
    finally:
        with contextlib.suppress(Exception):
            await app.close()
