"""Helpers of the SDK tests: a TCP proxy to cut a peer off, SDK clients with unique ids."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.sdk import AppClient, RunnerClient

EVENT_TIMEOUT_S = 10.0


class TcpProxy:
    """A loopback TCP proxy in front of a broker; `cut()` is the network going away.

    While cut, open connections are closed (as by a dead link: no DISCONNECT is sent)
    and new ones are refused by closing them at once; `restore()` lets them through again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut_off = False
        self._links: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress("127.0.0.1", self.port)

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._links.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        self._links.discard(writer)
        self._links.discard(up_writer)


async def forget_session(address: BrokerAddress, client_id: str) -> None:
    """End a persistent broker session (clean start, session expiry 0)."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    with contextlib.suppress(aiomqtt.MqttError):
        async with aiomqtt.Client(
            address.host,
            address.port,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=props,
            timeout=5,
        ):
            pass


@dataclass
class SdkPeers:
    """Makes SDK runners and apps with ids unique to the test; sessions ended afterwards."""

    address: BrokerAddress
    prefix: str
    made: list[tuple[BrokerAddress, str]] = field(default_factory=list)

    def unique(self, name: str) -> str:
        return f"{name}-{uuid.uuid4().hex[:8]}"

    def runner(
        self, ident: str | None = None, *, address: BrokerAddress | None = None, **options: Any
    ) -> RunnerClient:
        ident = ident or self.unique("runner")
        options.setdefault("reconnect_max_s", 0.5)
        self.made.append((address or self.address, ident))
        return RunnerClient(ident, address or self.address, prefix=self.prefix, **options)

    def app(
        self, ident: str | None = None, *, address: BrokerAddress | None = None, **options: Any
    ) -> AppClient:
        ident = ident or self.unique("app")
        options.setdefault("reconnect_max_s", 0.5)
        self.made.append((address or self.address, ident))
        return AppClient(ident, address or self.address, prefix=self.prefix, **options)

    async def cleanup(self) -> None:
        for address, client_id in self.made:
            await forget_session(address, client_id)


@contextlib.asynccontextmanager
async def sdk_peers(address: BrokerAddress, prefix: str) -> AsyncIterator[SdkPeers]:
    made = SdkPeers(address, prefix)
    try:
        yield made
    finally:
        await made.cleanup()


async def next_of(
    client: RunnerClient | AppClient, kind: type, timeout_s: float = EVENT_TIMEOUT_S
) -> Any:
    """The next event of type `kind` (others are skipped)."""
    async with asyncio.timeout(timeout_s):
        while True:
            event = await client.next_event()
            if isinstance(event, kind):
                return event
