"""One MQTT connection kept up: reconnect with backoff, and a twin named, not fought.

aiomqtt 2.x does not reconnect by itself, so `MqttLink.run` loops around one reused
`aiomqtt.Client`: connect, run the caller's session until it returns (a stop) or the
connection is lost, wait, connect again. The service has two such links: requests
(`<MQTT_CLIENT_ID>`) and presence (`<MQTT_CLIENT_ID>:presence`, `mqtt_pairing.presence`).

How long it waits before the next attempt (every delay is jittered by x0.5-1.0):

- a failed connect or a lost connection: 0.2 s, doubling up to `MQTT_RECONNECT_MAX_S`.
  The backoff starts again at 0.2 s only once a connection has stayed up `STABLE_S`, so a
  connection that keeps being closed at once is retried less and less often.
- a *takeover*, the broker giving this client id's session to another client: 30 s,
  doubling up to 120 s (`TAKEOVER_FIRST_S`, `TAKEOVER_MAX_S`). Two clients with one
  client id take the session from each other at every connect; backing off leaves the
  other one connected and keeps the takeovers to a few per minute.

How a takeover is recognised: `mqtt_pairing.twin.TwinJudge`, on evidence only. A
DISCONNECT with reason 0x8E (Session taken over; Mosquitto from 2.0.15) is one at once.
Mosquitto 2.0.11 closes the socket without a word, on MQTT 3.1.1 and 5 alike, which a
reset by a NAT or load balancer also does; so a close without DISCONNECT is a plain loss
(the normal backoff) unless it is one of `TWIN_CLOSES` closes within `TWIN_WINDOW_S`,
each `SHORT_S` or less after the broker accepted the connection and each followed by an
accepted reconnect. A close after a long-lived connection, or one followed by a refused
reconnect (a broker restart), never counts.

`conflict` says, while a twin is believed, that another client uses the client id (for
`/readyz`); it clears once a connection has stayed up `TWIN_CLEAR_S`, or on a plain loss
(another DISCONNECT reason, a keepalive timeout, a refused reconnect). Every loss is
logged once with its cause: "cannot connect" until the first connection, then
"connection lost".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from mqtt_pairing import twin
from mqtt_pairing.mqtt_address import BrokerAddress, describe_connect_error
from mqtt_pairing.twin import Loss, TwinJudge, Verdict

if TYPE_CHECKING:
    from mqtt_pairing.config import Settings

log = logging.getLogger(__name__)


class _LateSubackFilter(logging.Filter):
    """One line, not a traceback, for a SUBACK that arrives after its subscribe ended.

    aiomqtt 2.x logs a SUBACK whose subscribe call had already timed out or been
    cancelled (as on a stop) with `logger.exception` ('Unexpected message ID ... in
    on_subscribe callback'): harmless, and not an error of the service.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith("Unexpected message ID"):
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.INFO
            record.levelname = "INFO"
        return True


AIOMQTT_LOG = logging.getLogger("mqtt_pairing.aiomqtt")
"""The logger the service's aiomqtt clients write to (aiomqtt's own default: "mqtt")."""
AIOMQTT_LOG.addFilter(_LateSubackFilter())

BACKOFF_FIRST_S = 0.2
STABLE_S = 10.0
"""A connection up this long resets the reconnect backoff to `BACKOFF_FIRST_S`."""
TAKEOVER_FIRST_S = 30.0
TAKEOVER_MAX_S = 120.0
# TWIN_CLEAR_S (240 s) is twice TAKEOVER_MAX_S: a twin backing off comes back before it.

SESSION_TAKEN_OVER = 0x8E
KEEPALIVE_TIMEOUT = 0x8D
"""paho's reason code when it heard nothing from the broker for 1.5 keepalives."""

Session = Callable[[aiomqtt.Client], Awaitable[None]]


def make_client(
    address: BrokerAddress,
    settings: Settings,
    *,
    client_id: str,
    protocol: Literal["5", "3.1.1"],
    persistent: bool,
    receive_maximum: int,
) -> aiomqtt.Client:
    """An aiomqtt client for one of the service's connections.

    Args:
        address: the broker (`MQTT_URL`).
        settings: keepalive and session expiry.
        client_id: the MQTT client id.
        protocol: "5" or "3.1.1".
        persistent: keep the broker session across connections (clean start off and
            `MQTT_SESSION_EXPIRY_S`), or start clean every time.
        receive_maximum: MQTT 5 Receive Maximum (1-65535): how many QoS 1 messages the
            broker may have sent and not yet had acknowledged. Mosquitto takes it in place
            of its `max_inflight_messages` for this client.

    Raises:
        ConfigError: as `BrokerAddress.tls_context`.
    """
    kwargs: dict[str, Any] = {}
    if protocol == "5":
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = settings.mqtt_session_expiry_s if persistent else 0
        props.ReceiveMaximum = receive_maximum
        kwargs.update(
            protocol=aiomqtt.ProtocolVersion.V5, clean_start=not persistent, properties=props
        )
    else:
        kwargs.update(protocol=aiomqtt.ProtocolVersion.V311, clean_session=not persistent)
    return aiomqtt.Client(
        **address.client_options(),  # host, credentials, transport, verified TLS, NODELAY
        identifier=client_id,
        keepalive=settings.mqtt_keepalive_s,
        # Unbounded here: what arrives is bounded by the broker's in-flight window (the
        # Receive Maximum; max_inflight_messages for MQTT 3.1.1) where messages are
        # acknowledged after handling, and by the caller's own bounded queue where they
        # are acknowledged on arrival. A bounded aiomqtt queue drops messages silently.
        max_queued_incoming_messages=None,
        timeout=10,
        logger=AIOMQTT_LOG,
        **kwargs,
    )


def reason_code(exc: BaseException) -> int | None:
    """The MQTT reason code behind an aiomqtt error, or None.

    aiomqtt raises `MqttError("Disconnected during message iteration")` from the
    `MqttCodeError` its disconnect callback made of paho's reason code (a DISCONNECT
    packet's reason, or paho's own code for a socket closed or a keepalive missed);
    other calls raise `MqttCodeError` directly. `tests/reliability/test_twin.py` pins this.
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        rc = getattr(cause, "rc", None)
        if isinstance(rc, ReasonCode):
            return int(rc.value)
        cause = cause.__cause__ or cause.__context__
    return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What a link's log lines name: the broker and the client id."""

    address: BrokerAddress
    protocol: str
    client_id: str
    name: str
    """`requests` or `presence`."""


class MqttLink:
    """Keeps one MQTT connection up until `stop` is set.

    Args:
        client: the aiomqtt client, reused for every attempt.
        endpoint: broker and client id, for the log lines.
        reconnect_max_s: the cap of the reconnect backoff (`MQTT_RECONNECT_MAX_S`).
        counters: where to count `connect_failed.<name>`, `connection_lost.<name>` and
            `takeover.<name>` (the gateway's counters, exported as metrics).

    Attributes:
        connected: set while connected and `setup` has run.
        takeovers: takeovers seen (definite or inferred) since start.
    """

    def __init__(
        self,
        client: aiomqtt.Client,
        endpoint: Endpoint,
        *,
        reconnect_max_s: float,
        counters: Counter[str],
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.reconnect_max_s = reconnect_max_s
        self.counters = counters
        self.connected = asyncio.Event()
        self.takeovers = 0
        self._ever_connected = False
        self._up_since: float | None = None
        self._backoff = BACKOFF_FIRST_S
        self._takeover_delay = TAKEOVER_FIRST_S
        self._judge = TwinJudge()
        self._disconnect_packet = False
        """The last loss came with a DISCONNECT from the broker (not a closed socket)."""
        self._watch_disconnects()

    def _watch_disconnects(self) -> None:
        """Record whether a loss came with a DISCONNECT packet; aiomqtt drops that flag."""
        paho = self.client._client  # not exposed by aiomqtt 2.5
        forward = paho.on_disconnect

        def on_disconnect(*args: Any) -> None:  # noqa: ANN401
            flags = args[2] if len(args) > 2 else None
            self._disconnect_packet = bool(getattr(flags, "is_disconnect_packet_from_server", 0))
            if forward is not None:
                forward(*args)

        paho.on_disconnect = on_disconnect

    @property
    def conflict(self) -> str | None:
        """A one-line reason while another client appears to use this client id, else None."""
        if self._judge.twin(asyncio.get_running_loop().time()):
            return f"mqtt client id {self.endpoint.client_id} is used by another client"
        return None

    async def run(self, setup: Session, serve: Session, stop: asyncio.Event) -> None:
        """Connect, `setup`, `serve` until it returns; reconnect on a lost connection.

        Returns once `stop` is set (`serve` must return then); never because of a broker
        error.

        Args:
            setup: runs on every new connection (subscriptions), before `connected` is set.
            serve: runs while connected; returns on `stop`, raises `aiomqtt.MqttError`
                when the connection is lost.
            stop: ends the loop.
        """
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                async with self.client:
                    self._on_connect(loop.time())
                    await setup(self.client)
                    self.connected.set()
                    self._log_connected()
                    await serve(self.client)
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                if stop.is_set():
                    break
                delay = self._after_error(exc, loop.time())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            finally:
                self.connected.clear()
                self._up_since = None

    def _on_connect(self, now: float) -> None:
        self._ever_connected = True
        self._up_since = now
        self._disconnect_packet = False
        if self._judge.connected(now):
            e = self.endpoint
            log.error(
                "another client is using MQTT client id %s (%s connection): the broker "
                "closed the connection %d times within %.0f s, each time within %.0f s of "
                "accepting it, and took us back at once. Each connect takes the session from "
                "the other; give every instance its own MQTT_CLIENT_ID",
                e.client_id,
                e.name,
                twin.TWIN_CLOSES,
                twin.TWIN_WINDOW_S,
                twin.SHORT_S,
            )

    def _log_connected(self) -> None:
        e = self.endpoint
        what = "connected to the broker" if e.name == "requests" else f"{e.name} connection up:"
        a = e.address
        log.info(
            "%s at %s:%d (MQTT %s, client id %s)", what, a.host, a.port, e.protocol, e.client_id
        )

    def _loss(self, exc: aiomqtt.MqttError) -> Loss:
        code = reason_code(exc)
        if code == SESSION_TAKEN_OVER:
            return Loss.TAKEN_OVER
        if code is None:
            return Loss.UNKNOWN  # an operation of ours failed or timed out
        if code == KEEPALIVE_TIMEOUT:
            return Loss.TIMEOUT  # our side gave up, not the broker
        if self._disconnect_packet:
            return Loss.DISCONNECT
        return Loss.CLOSED

    def _after_error(self, exc: aiomqtt.MqttError, now: float) -> float:
        """Count and log the failure; returns how long to wait before the next attempt."""
        e = self.endpoint
        up_since, self._up_since = self._up_since, None
        if up_since is None:  # the attempt itself failed
            self._judge.connect_failed()
            self.counters[f"connect_failed.{e.name}"] += 1
            delay = self._next_backoff()
            verb = "reconnect" if self._ever_connected else "connect"
            log.warning(
                "cannot %s to the broker (%s connection): %s; retrying in %.1f s",
                verb,
                e.name,
                describe_connect_error(exc, e.address),
                delay,
            )
            return delay
        self.counters[f"connection_lost.{e.name}"] += 1
        up_s = now - up_since
        if up_s >= STABLE_S:
            self._backoff = BACKOFF_FIRST_S
        how = self._loss(exc)
        if self._judge.lost(now, how) is Verdict.TAKEOVER:
            if how is Loss.TAKEN_OVER:
                return self._takeover(
                    "the broker gave this client id's session to another client "
                    "(DISCONNECT reason 0x8E, session taken over)"
                )
            return self._takeover(
                f"the broker closed the connection again {up_s:.1f} s after accepting it, "
                "as it does when another client connects with the same client id"
            )
        delay = self._next_backoff()
        log.warning(
            "broker connection lost (%s connection, %s); reconnecting in %.1f s",
            e.name,
            exc.__cause__ or exc,
            delay,
        )
        return delay

    def _takeover(self, what: str) -> float:
        e = self.endpoint
        self.takeovers += 1
        self.counters[f"takeover.{e.name}"] += 1
        delay = self._takeover_delay * random.uniform(0.5, 1.0)  # jitter, not a secret
        self._takeover_delay = min(self._takeover_delay * 2, TAKEOVER_MAX_S)
        log.error(
            "another client is using MQTT client id %s (%s connection): %s. Each connect "
            "takes the session from the other; give every instance its own MQTT_CLIENT_ID. "
            "Reconnecting in %.0f s",
            e.client_id,
            e.name,
            what,
            delay,
        )
        return delay

    def _next_backoff(self) -> float:
        delay = min(self._backoff, self.reconnect_max_s) * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2, self.reconnect_max_s)
        if self.conflict is None:
            self._takeover_delay = TAKEOVER_FIRST_S
        return delay
