"""Where and how to reach the broker: MQTT URLs, verified TLS, one-line connection errors.

Used by everything that connects to a broker: the service's gateway, the client SDK and
the simulated peers. The rule (docs/security.md, "TLS"): a TLS URL (`mqtts://`, `wss://`)
always means TLS, with the broker's certificate verified against the system's trust store
or a private CA (`MQTT_CA_FILE`, peers' `--ca-file`) and its name checked against the
URL's host. Turning verification off takes an explicit flag (`MQTT_TLS_INSECURE`,
`--tls-insecure`) and logs a warning each time such a connection is set up. A plain URL
never silently becomes TLS, and TLS options on a plain URL are refused rather than
ignored.

aiomqtt 2.5 turns every connection failure into `aiomqtt.MqttError(str(exc))` raised
``from None``; the original exception stays reachable as its ``__context__``, which
`describe_connect_error` reads to say what went wrong in one line
(tests/unit/test_mqtt_address.py pins that behaviour).
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from mqtt_pairing.config import redact_url
from mqtt_pairing.errors import ConfigError

__all__ = [
    "NODELAY",
    "BrokerAddress",
    "BrokerUnreachable",
    "describe_connect_error",
    "open_connection",
]

log = logging.getLogger(__name__)

NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
"""Socket option for aiomqtt's `socket_options`: Nagle's algorithm costs ~40 ms a hop."""

Transport = Literal["tcp", "websockets"]

_SCHEMES: dict[str, tuple[int, Transport, bool]] = {
    # scheme: (default port, transport, TLS)
    "mqtt": (1883, "tcp", False),
    "tcp": (1883, "tcp", False),
    "mqtts": (8883, "tcp", True),
    "ssl": (8883, "tcp", True),
    "ws": (80, "websockets", False),
    "wss": (443, "websockets", True),
}

INSECURE_WARNING = (
    "TLS certificate verification is OFF for {where} (MQTT_TLS_INSECURE / --tls-insecure): "
    "anyone on the network path can pose as the broker and read passwords and codes"
)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where and how to connect to the broker.

    Attributes:
        host: host name or address (the name a TLS certificate must carry).
        port: TCP port.
        transport: ``tcp`` or ``websockets``.
        tls: whether to use TLS (``mqtts://``, ``wss://``).
        username: MQTT username, or None.
        password: MQTT password, or None (never shown by `repr`).
        websocket_path: HTTP path of a WebSockets listener (``/mqtt`` by default).
        ca_file: PEM file of the CA(s) to trust instead of the system's trust store.
        tls_insecure: accept any certificate and any name (a warning is logged).

    Raises:
        ConfigError: `ca_file` or `tls_insecure` given for a plain (non-TLS) address.
    """

    host: str
    port: int
    transport: Transport = "tcp"
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    websocket_path: str | None = None
    ca_file: str | None = None
    tls_insecure: bool = False

    def __post_init__(self) -> None:
        if not self.tls and (self.ca_file or self.tls_insecure):
            raise ConfigError(
                "a CA file or insecure TLS is set for a plain broker address; "
                "use an mqtts:// or wss:// URL (TLS is never switched on or off implicitly)"
            )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        tls_insecure: bool = False,
        setting: str = "MQTT_URL",
        ca_setting: str = "MQTT_CA_FILE",
    ) -> BrokerAddress:
        """Parse an MQTT URL: ``mqtt://``, ``mqtts://``, ``ws://`` or ``wss://``.

        ``mqtt`` and ``ws`` are plain; ``mqtts`` and ``wss`` are TLS (``tcp`` and ``ssl``
        are accepted as aliases of the first two). Default ports: 1883, 8883, 80, 443;
        default WebSockets path ``/mqtt``.

        Args:
            url: the URL; user and password in it (percent-encoded) win over the
                arguments.
            username: used when the URL has none (`MQTT_USERNAME`).
            password: used when the URL has none (`MQTT_PASSWORD`).
            ca_file: CA bundle for a TLS URL (`MQTT_CA_FILE`).
            tls_insecure: turn certificate verification off (`MQTT_TLS_INSECURE`).
            setting: the name errors give the URL (``MQTT_URL``, ``--mqtt-url``).
            ca_setting: the name errors give the CA file (``MQTT_CA_FILE``, ``--ca-file``).

        Returns:
            The address.

        Raises:
            ConfigError: unknown scheme, missing host, bad port, TLS options with a
                plain URL, or a CA file that cannot be read; one line, the URL's password
                redacted.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise ConfigError(f"{setting}: invalid URL or port ({redact_url(url)})") from None
        scheme = parts.scheme.lower()
        if scheme not in _SCHEMES or not parts.hostname:
            raise ConfigError(
                f"{setting}: expected mqtt://, mqtts://, ws:// or wss://host[:port]"
                f" ({redact_url(url)})"
            )
        default_port, transport, tls = _SCHEMES[scheme]
        if not tls and (ca_file or tls_insecure):
            raise ConfigError(
                f"{setting} is a plain {scheme}:// URL, but a CA file or insecure TLS is set; "
                "use mqtts:// or wss:// (TLS is never switched on or off implicitly)"
            )
        if tls and ca_file:
            try:
                _verifying_context(ca_file)  # an unreadable CA file is a setting error, now
            except ConfigError as exc:
                raise ConfigError(f"{ca_setting}: {exc}") from None
        return cls(
            host=parts.hostname,
            port=port or default_port,
            transport=transport,
            tls=tls,
            username=unquote(parts.username) if parts.username else username,
            password=unquote(parts.password) if parts.password else password,
            websocket_path=(parts.path or "/mqtt") if transport == "websockets" else None,
            ca_file=ca_file or None,
            tls_insecure=tls_insecure,
        )

    @property
    def where(self) -> str:
        """``scheme://host:port[/path]`` for messages: no user, no password."""
        scheme = {
            ("tcp", False): "mqtt",
            ("tcp", True): "mqtts",
            ("websockets", False): "ws",
            ("websockets", True): "wss",
        }[self.transport, self.tls]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.websocket_path or ''}"

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context to connect with, or None for a plain address.

        Verification is on: the certificate must chain to the system's trust store, or
        to `ca_file` when set, and name `host`; TLS 1.2 at least. With `tls_insecure`
        both checks are off and a warning is logged.

        Returns:
            A new `ssl.SSLContext`, or None when `tls` is false.

        Raises:
            ConfigError: `ca_file` cannot be read or holds no usable certificate.
        """
        if not self.tls:
            return None
        context = _verifying_context(self.ca_file)
        if self.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            log.warning(INSECURE_WARNING.format(where=self.where))
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for `aiomqtt.Client` that say where and how to connect.

        Returns:
            ``hostname``, ``port``, ``username``, ``password``, ``transport``,
            ``websocket_path``, ``tls_context`` and ``socket_options`` (TCP_NODELAY);
            the caller adds identity, protocol and session options.

        Raises:
            ConfigError: as `tls_context`.
        """
        return {
            "hostname": self.host,
            "port": self.port,
            "username": self.username,
            "password": self.password,
            "transport": self.transport,
            "websocket_path": self.websocket_path,
            "tls_context": self.tls_context(),
            "socket_options": [NODELAY],
        }


class _ClosedOnFailedHandshake(ssl.SSLSocket):
    """An `ssl.SSLSocket` that closes itself when its handshake fails.

    paho 2.2 drops the socket of a failed handshake without closing it (a ResourceWarning
    and a file descriptor held until garbage collection, once per reconnect attempt).
    Installed through `SSLContext.sslsocket_class`, the documented hook.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _verifying_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies the chain (system store or `ca_file`) and the name.

    Raises:
        ConfigError: `ca_file` cannot be read or holds no usable certificate.
    """
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"CA file {ca_file}: no such file") from None
    except PermissionError:
        raise ConfigError(f"CA file {ca_file}: permission denied") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            f"CA file {ca_file}: not a PEM certificate bundle ({_reason(exc)})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _ClosedOnFailedHandshake
    return context


class BrokerUnreachable(aiomqtt.MqttError):
    """Connecting to the broker failed; the message is one line (`describe_connect_error`)."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def describe_connect_error(exc: BaseException, address: BrokerAddress) -> str:
    """One line saying why a connection to `address` failed, for logs and CLI errors.

    Args:
        exc: what connecting raised: an `aiomqtt.MqttError` (whose ``__context__`` holds
            the socket or TLS error) or that error itself.
        address: where the connection went.

    Returns:
        A line without the password, e.g. ``TLS handshake with mqtts://h:1883 failed
        (unexpected eof while reading): is that port a TLS listener?``.
    """
    if isinstance(exc, BrokerUnreachable):
        return str(exc)
    cause: BaseException = exc
    if isinstance(exc, aiomqtt.MqttError) and isinstance(exc.__context__, OSError):
        cause = exc.__context__
    where = address.where
    if isinstance(cause, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate of {where} not accepted ({_reason(cause)}); if the broker "
            "uses a private CA, pass it with MQTT_CA_FILE / --ca-file"
        )
    if address.tls and isinstance(cause, ssl.SSLError | ConnectionResetError | EOFError):
        return f"TLS handshake with {where} failed ({_reason(cause)}): is that port a TLS listener?"
    if isinstance(cause, ConnectionRefusedError):
        return f"connection to {where} refused (nothing listens there?)"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve {address.host} ({_reason(cause)})"
    if isinstance(cause, TimeoutError | socket.timeout):
        return f"connection to {where} timed out"
    if isinstance(exc, MqttConnectError):
        return f"the broker at {where} refused the connection: {exc}"
    if isinstance(exc, aiomqtt.MqttError):
        return f"{where}: {exc}"  # a connection that was up and is lost, a timeout, ...
    return f"cannot connect to {where}: {_reason(cause)}"


async def open_connection(client: aiomqtt.Client, address: BrokerAddress) -> None:
    """Connect `client` (``await client.__aenter__()``) with a one-line error on failure.

    Args:
        client: a client made with ``address.client_options()``.
        address: where it connects (for the message).

    Raises:
        BrokerUnreachable: the connection failed; the message is one line.
    """
    try:
        await client.__aenter__()
    except aiomqtt.MqttError as exc:
        raise BrokerUnreachable(describe_connect_error(exc, address)) from exc
