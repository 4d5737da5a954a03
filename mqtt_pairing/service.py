"""Assembling and running the service: settings -> store, broker, gateway.

`run_service` is what `mqtt-pairing serve` runs. Startup failures (a bad setting, the
listen port taken, Redis unreachable) raise `ConfigError` with one line; the broker being
unreachable is not a startup failure: the gateway keeps retrying with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from amqtt.broker import Broker
from redis.exceptions import RedisClusterException, RedisError

from mqtt_pairing import logs, metrics
from mqtt_pairing.broker import (
    InMemoryRedis,
    check_port_free,
    parse_listen,
    start_embedded_broker,
)
from mqtt_pairing.config import Settings, check_service_client_id, redact_url, shared_group
from mqtt_pairing.dispatcher import Dispatcher
from mqtt_pairing.errors import ConfigError, PairingError
from mqtt_pairing.gateway import PairingGateway
from mqtt_pairing.health import HealthServer
from mqtt_pairing.mqtt_address import BrokerAddress
from mqtt_pairing.store import KeySchema, PairingStore, connect_redis

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:1883"


def resolve_secret(settings: Settings) -> tuple[bytes, bool]:
    """`PAIRING_SECRET` as bytes, or a fresh one in embedded mode.

    Returns:
        (secret, generated).

    Raises:
        ConfigError: Redis is external and no secret is set (docs/protocol.md: all instances
            must share it; the service refuses to start without it).
    """
    if settings.pairing_secret is not None:
        return settings.pairing_secret.get_secret_value().encode(), False
    if settings.external_redis:
        raise ConfigError(
            "PAIRING_SECRET: required with an external Redis (at least 32 bytes, the same "
            "on every instance); make one with: openssl rand -base64 48"
        )
    return secrets.token_bytes(32), True


@dataclass
class Service:
    """A running service: what `stop` and `close` act on."""

    settings: Settings
    store: PairingStore
    gateway: PairingGateway
    redis_url: str
    broker: Broker | None = None
    memory: InMemoryRedis | None = None
    health: HealthServer | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def stop(self) -> None:
        """Stop taking requests; `run` returns when in-flight ones are done."""
        self.gateway.stop()

    async def run(self) -> None:
        """Serve until `stop`."""
        await self.gateway.run()

    async def ready(self) -> tuple[bool, str]:
        """Readiness: our client ids are ours alone, the broker is connected, Redis answers.

        Returns:
            (ready, reason): the reason says what is wrong (`/readyz`'s status).
        """
        conflict = self.gateway.conflict
        if conflict is not None:
            return False, conflict
        if not self.gateway.connected.is_set():
            return False, "broker not connected"
        try:
            await self.store.ping()
        except PairingError:
            return False, "redis unreachable"
        return True, "ok"

    async def close(self) -> None:
        """Release the store, the embedded broker and the in-memory store."""
        if self.health is not None:
            await self.health.close()
        with contextlib.suppress(Exception):
            await self.store.aclose()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                await self.broker.shutdown()
        if self.memory is not None:
            self.memory.stop()


async def _open_store(settings: Settings) -> tuple[PairingStore, str, InMemoryRedis | None]:
    """The store: external Redis, or the in-memory store on a local port."""
    memory: InMemoryRedis | None = None
    url = settings.redis_cluster_url or settings.resolved_redis_url()
    if url is None:
        memory = InMemoryRedis()
        memory.start()
        url = memory.url
    store = PairingStore(
        connect_redis(
            url,
            timeout_s=settings.redis_timeout_s,
            cluster=bool(settings.redis_cluster_url),
            max_inflight=settings.pairing_max_inflight,
        ),
        KeySchema(settings.pairing_key_prefix),
    )
    try:
        await store.client.ping()  # quietly: the failure is the one line ConfigError says
    except (RedisError, RedisClusterException, OSError):
        await store.aclose()
        if memory is not None:
            memory.stop()
        raise ConfigError(f"Redis is unreachable at {redact_url(url)}") from None
    if memory is not None:
        log.info("in-memory store (fakeredis); for admin commands: REDIS_URL=%s", url)
    else:
        log.info("Redis: %s", redact_url(url))
        try:
            moved = await store.migrate_legacy_limits()
        except PairingError:  # tried again at the next start
            log.warning("could not move the bans of an earlier version: Redis unreachable")
        else:
            if moved:
                log.info("moved %d bans and allowlist entries of an earlier version", moved)
    return store, url, memory


async def _attach_broker(
    settings: Settings, listen: str, broker_config: Path | None, share_group: str
) -> tuple[BrokerAddress, Literal["5", "3.1.1"], str, Broker | None]:
    """(address, protocol, share group, embedded broker or None)."""
    if not settings.embedded_broker:
        assert settings.mqtt_url is not None  # noqa: S101 - not embedded
        password = settings.mqtt_password.get_secret_value() if settings.mqtt_password else None
        address = BrokerAddress.from_url(
            settings.mqtt_url,
            username=settings.mqtt_username,
            password=password,
            ca_file=settings.mqtt_ca_file,
            tls_insecure=settings.mqtt_tls_insecure,
        )
        log.info("MQTT broker: %s", redact_url(settings.mqtt_url))
        return address, settings.mqtt_protocol, share_group, None
    host, port = parse_listen(listen)
    broker = await start_embedded_broker(host, port, broker_config)
    log.info("embedded MQTT broker (amqtt, MQTT 3.1.1) listening on %s:%d", host, port)
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # noqa: S104 - a wildcard bind
    return BrokerAddress(host=local, port=port), "3.1.1", "", broker


async def build_service(
    settings: Settings,
    *,
    listen: str = DEFAULT_LISTEN,
    broker_config: Path | None = None,
) -> Service:
    """Set up the store and broker connection as the settings say.

    Raises:
        ConfigError: a bad setting, the listen address taken, or Redis unreachable.
    """
    secret, generated = resolve_secret(settings)
    check_service_client_id(settings.mqtt_client_id)
    if (
        settings.embedded_broker
        and "pairing_shared_group" in settings.model_fields_set
        and settings.pairing_shared_group
    ):
        raise ConfigError(
            "PAIRING_SHARED_GROUP: the embedded broker has no shared subscriptions; "
            "set MQTT_URL to use one"
        )
    if settings.embedded_broker:
        check_port_free(*parse_listen(listen))  # before anything else says a word
    store, url, memory = await _open_store(settings)
    try:
        address, protocol, share_group, broker = await _attach_broker(
            settings,
            listen,
            broker_config,
            shared_group(settings, secret, secret_generated=generated),
        )
    except ConfigError:
        await store.aclose()
        if memory is not None:
            memory.stop()
        raise
    if generated:
        log.info("generated a pairing secret for this process (embedded mode)")
    dispatcher = Dispatcher(store, settings, secret)
    gateway = PairingGateway(
        settings, dispatcher, address, protocol=protocol, share_group=share_group
    )
    service = Service(settings, store, gateway, url, broker=broker, memory=memory)
    if settings.pairing_health_listen:
        health_host, health_port = parse_listen(settings.pairing_health_listen)
        service.health = HealthServer(
            health_host,
            health_port,
            service.ready,
            metrics=lambda: (metrics.render(gateway), metrics.CONTENT_TYPE),
        )
        try:
            await service.health.start()
        except OSError as exc:
            await service.close()
            raise ConfigError(
                f"PAIRING_HEALTH_LISTEN: cannot listen on {health_host}:{health_port} "
                f"({exc.strerror or exc})"
            ) from None
    return service


async def run_service(
    settings: Settings, *, listen: str = DEFAULT_LISTEN, broker_config: Path | None = None
) -> int:
    """Run until SIGTERM or SIGINT; returns the exit code (0 after a clean stop).

    Raises:
        ConfigError: startup failed (one line).
    """
    service = await build_service(settings, listen=listen, broker_config=broker_config)
    logs.set_instance(service.gateway.instance_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stop)
    log.info(
        "mqtt-pairing serving (instance %s, topic prefix %r)",
        service.gateway.instance_id,
        settings.pairing_topic_prefix,
    )
    try:
        await service.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await service.close()
    log.info("mqtt-pairing stopped")
    return 0
