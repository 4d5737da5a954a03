"""Prometheus metrics of one instance, served on `/metrics` beside the health endpoints.

Every sample carries the label `instance` (the gateway's instance id, `<MQTT_CLIENT_ID>/
<8 hex>`), so that the instances behind one shared subscription can be told apart and
summed. The counters are the in-process ones the dispatcher, the gateway and its presence
recorder keep (`Dispatcher.counters`, `PairingGateway.counters`,
`PresenceRecorder.counters`); they start at 0 with the process, as
Prometheus counters do. Rendering uses `prometheus_client`'s text exposition format.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mqtt_pairing import __version__

if TYPE_CHECKING:
    from mqtt_pairing.gateway import PairingGateway

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayCollector(Collector):
    """Collects the counters of one gateway (and its dispatcher and store) on each scrape.

    Metrics:
        mqtt_pairing_info{instance, version}: 1.
        mqtt_pairing_broker_connected{instance}: 1 while the requests connection is up.
        mqtt_pairing_presence_connected{instance}: 1 while the presence connection is up
            (only the instance that records presence has one).
        mqtt_pairing_client_id_conflict{instance, connection}: 1 while another client
            appears to use the client id of that connection (`requests`, `presence`).
        mqtt_pairing_requests_in_flight{instance}: messages being processed now.
        mqtt_pairing_presence_backlog{instance}: status messages read, not yet recorded.
        mqtt_pairing_presence_backlog_limit{instance}: `PAIRING_PRESENCE_BACKLOG`; past
            it status messages are dropped (`status_shed`) until a reconciliation.
        mqtt_pairing_presence_reconcile_seconds{instance}: how long the last presence
            reconciliation took (absent before the first).
        mqtt_pairing_replies_total{instance, op, outcome}: replies by op and by `ok` or
            error code (docs/protocol.md "Error codes"); `op` is a runner or app op, or
            `unknown` for any other name a client used (a bounded label set).
        mqtt_pairing_events_total{instance, name}: everything else counted (`replay`,
            `status`, `dropped.<reason>` (`dropped.retained`: a retained request ignored;
            `dropped.flood`: a request of a client over its RATE_LIMITED replies a
            second, dropped without a reply),
            `status_shed`, `presence.reconciled`, `request_window_full`, `shed` (a
            request answered RATE_LIMITED for its client's share of the window),
            `refused.<why>` (a Response Topic or Correlation Data too long),
            `reply_oversized`, `dropped.poison`,
            `connect_failed.<connection>`, `connection_lost.<connection>`,
            `takeover.<connection>`, `publish_failed`, `internal_error`, ...).
        mqtt_pairing_redis_round_trips_total{instance}: Redis round trips (a pipeline is
            one).
    """

    def __init__(self, gateway: PairingGateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Metric]:
        """The samples, read from the live counters."""
        gw = self.gateway
        instance = gw.instance_id
        info = GaugeMetricFamily(
            "mqtt_pairing_info", "This instance.", labels=["instance", "version"]
        )
        info.add_metric([instance, __version__], 1)
        yield info
        connected = GaugeMetricFamily(
            "mqtt_pairing_broker_connected",
            "1 while the broker connection is up.",
            labels=["instance"],
        )
        connected.add_metric([instance], float(gw.connected.is_set()))
        yield connected
        presence = gw.presence
        gauge = GaugeMetricFamily(
            "mqtt_pairing_presence_connected",
            "1 while the presence connection is up.",
            labels=["instance"],
        )
        gauge.add_metric([instance], float(presence.link.connected.is_set()))
        yield gauge
        conflict = GaugeMetricFamily(
            "mqtt_pairing_client_id_conflict",
            "1 while another client appears to use this connection's client id.",
            labels=["instance", "connection"],
        )
        for link in (gw.link, presence.link):
            conflict.add_metric([instance, link.endpoint.name], float(link.conflict is not None))
        yield conflict
        for name, text, value in (
            ("backlog", "Status messages read, not yet recorded.", presence.backlog),
            (
                "backlog_limit",
                "Status messages held at most (PAIRING_PRESENCE_BACKLOG).",
                presence.limit,
            ),
        ):
            gauge = GaugeMetricFamily(f"mqtt_pairing_presence_{name}", text, labels=["instance"])
            gauge.add_metric([instance], float(value))
            yield gauge
        if presence.last_reconcile_s is not None:
            gauge = GaugeMetricFamily(
                "mqtt_pairing_presence_reconcile_seconds",
                "How long the last presence reconciliation took.",
                labels=["instance"],
            )
            gauge.add_metric([instance], presence.last_reconcile_s)
            yield gauge
        in_flight = GaugeMetricFamily(
            "mqtt_pairing_requests_in_flight",
            "Request messages being processed now.",
            labels=["instance"],
        )
        in_flight.add_metric([instance], float(gw.in_flight))
        yield in_flight
        replies = CounterMetricFamily(
            "mqtt_pairing_replies",
            "Replies by op and outcome (ok or the error code).",
            labels=["instance", "op", "outcome"],
        )
        events = CounterMetricFamily(
            "mqtt_pairing_events",
            "Other things counted by name.",
            labels=["instance", "name"],
        )
        for (op, outcome), n in sorted(gw.dispatcher.replies.items()):
            replies.add_metric([instance, op, outcome], n)
        counted = gw.dispatcher.counters + gw.counters + gw.presence.counters
        for name, n in sorted(counted.items()):
            if not name.startswith(("ok.", "error.")):  # those are the replies above
                events.add_metric([instance, name], n)
        yield replies
        yield events
        trips = CounterMetricFamily(
            "mqtt_pairing_redis_round_trips",
            "Redis round trips (a pipeline counts as one).",
            labels=["instance"],
        )
        trips.add_metric([instance], gw.dispatcher.store.round_trips)
        yield trips


def render(gateway: PairingGateway) -> bytes:
    """The text exposition of one gateway's metrics."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(gateway))
    return generate_latest(registry)
