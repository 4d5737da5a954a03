"""`BrokerAddress` and `NODELAY` live in `mqtt_pairing.mqtt_address` only: the gateway no
longer re-exports them, so nothing new comes to depend on the old place."""

from __future__ import annotations

import mqtt_pairing.gateway as gateway
import mqtt_pairing.mqtt_address as mqtt_address


def test_the_gateway_does_not_re_export_the_broker_address() -> None:
    assert gateway.__all__ == ["PairingGateway"]
    for name in ("BrokerAddress", "NODELAY"):
        assert hasattr(mqtt_address, name)
        assert not hasattr(gateway, name), name
