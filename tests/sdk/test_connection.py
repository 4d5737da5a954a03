"""What the SDK's connection relies on past aiomqtt's public API, and protocol "auto"."""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings

import pytest

from mqtt_pairing.broker import start_embedded_broker
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sdk import ConnectFailed, RunnerClient
from tests.harness.servers import free_port


async def test_auto_falls_back_to_311_on_amqtt_and_closes_the_mqtt5_socket(
    topic_prefix: str,
) -> None:
    """amqtt answers an MQTT 5 CONNECT with properties with silence: the 3 s probe gives
    up, the abandoned socket is closed (paho's disconnect through `_client`), 3.1.1 works."""
    port = free_port()
    broker = await start_embedded_broker("127.0.0.1", port)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            runner = RunnerClient(
                "r1", BrokerAddress("127.0.0.1", port), prefix=topic_prefix, protocol="auto"
            )
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with runner:
                assert runner.connection.protocol == "3.1.1"
                assert loop.time() - started < 10  # not the whole client timeout
                assert set(runner.connection._clients) == {"3.1.1"}
                assert runner.connection.client.timeout == 10  # restored after the probe
            await asyncio.sleep(0)
            gc.collect()
    finally:
        await broker.shutdown()


async def test_a_first_connection_that_cannot_be_made_says_why() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        runner = RunnerClient(
            "r1", BrokerAddress("127.0.0.1", port), connect_timeout_s=1, retry_first_connect=False
        )
        with pytest.raises(ConnectFailed, match="refused"):
            await runner.open()
