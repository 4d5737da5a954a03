"""Transport: connections to Redis, one round trip for a batch of calls, NOSCRIPT, errors.

Scripts live in `lua/` beside the store's modules, each with its `KEYS`/`ARGV` contract at
the top; `_prelude.lua` (Redis time in ms) is prepended to each. They are sent once and run
by EVALSHA; a script is reloaded after `NOSCRIPT` (restart, failover, SCRIPT FLUSH).
Redis errors are turned into domain errors here and nowhere else: connection problems and
timeouts become `StoreUnavailable`, anything else `InternalError`. The aggregates (limits,
codes, sessions, outbox, history) build on `Transport`; `PairingStore` combines them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar, Literal, TypeVar, cast

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from mqtt_pairing.errors import (
    InternalError,
    StoreUnavailable,
)
from mqtt_pairing.store.keys import MS_PER_S, KeySchema
from mqtt_pairing.store.pipelining import Coalescer

_hiredis_pack = cast("Callable[[tuple[EncodableT, ...]], bytes]", hiredis.pack_command)

log = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["runner", "app"]

_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ClusterError,  # CLUSTERDOWN, MASTERDOWN
    TryAgainError,  # a slot moving during resharding
    ReadOnlyError,  # a replica being promoted
    SlotNotCoveredError,  # a master down and no replica took over yet
)
"""Errors that mean "Redis is not there right now": SERVICE_UNAVAILABLE, retry later."""

UNAVAILABLE_RETRY_S = 2
"""`retry_after_s` of a SERVICE_UNAVAILABLE reply."""


def load_prelude_source() -> str:
    """The Lua functions every script starts with (store/lua/_prelude.lua)."""
    return (resources.files("mqtt_pairing.store") / "lua" / "_prelude.lua").read_text() + "\n"


def load_script_source(name: str) -> str:
    """The Lua source of script `name`, with the shared prelude prepended."""
    lua = resources.files("mqtt_pairing.store") / "lua"
    return load_prelude_source() + (lua / f"{name}.lua").read_text()


DEFAULT_MAX_INFLIGHT = 256
"""`PAIRING_MAX_INFLIGHT`'s default, for clients made without the service's settings."""
RESERVED_CONNECTIONS = 16
"""Connections beyond the request window, for the service's own work (presence workers,
presence lease, outbox and expiry sweeps, health checks) and the odd second call."""


def pool_size(max_inflight: int) -> int:
    """Redis connections per service instance (per node on a cluster).

    One per request in flight (`PAIRING_MAX_INFLIGHT`) plus `RESERVED_CONNECTIONS`: on
    one Redis a request makes its store calls one after another, each on one connection
    (a batch is one write), so the window never needs more. On a cluster a batch runs
    its calls at once; calls beyond the pool wait their turn. Either way, what exceeds
    the pool waits (docs/design.md "Redis connections").
    """
    return max_inflight + RESERVED_CONNECTIONS


def call_deadline_s(timeout_s: float) -> float:
    """The bound on one whole store call, seconds.

    `REDIS_TIMEOUT_S` to get a connection plus `REDIS_TIMEOUT_S` for its I/O, whatever
    redis-py does underneath (a cluster client's retries and topology refreshes included).
    """
    return 2 * timeout_s


def connect_redis(
    url: str,
    *,
    timeout_s: float = 1.0,
    cluster: bool = False,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
) -> aioredis.Redis:
    """A redis-py asyncio client for `url` with timeouts and a bounded pool that waits.

    docs/design.md "Redis connections": timeouts on connect and on every command, and
    `pool_size(max_inflight)` connections.

    Args:
        url: `redis://` or `rediss://` URL (with password and db as usual).
        timeout_s: `REDIS_TIMEOUT_S`: socket connect and read timeout, and the longest
            wait for a free connection, seconds.
        cluster: use `RedisCluster` (any node of the cluster as `url`). It runs EVALSHA on
            the node that owns the keys' slot, which is why every script keeps to one
            hash tag; it shares the command API, hence the return type.
        max_inflight: `PAIRING_MAX_INFLIGHT`; the pool holds `pool_size(max_inflight)`
            connections (per node on a cluster).

    On one Redis the pool is a `BlockingConnectionPool`: a call that finds every
    connection busy waits up to `timeout_s` for one (then `ConnectionError`, i.e.
    SERVICE_UNAVAILABLE) instead of redis-py's default `MaxConnectionsError` at once.
    redis-py's cluster nodes cannot wait; `PairingStore` lets no more calls run at once
    than a node holds connections.
    """
    size = pool_size(max_inflight)
    if cluster:
        client = RedisCluster.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            max_connections=size,
        )
        return cast(aioredis.Redis, client)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        max_connections=size,
        timeout=timeout_s,
    )
    pool.connection_class = _PACK_ONCE.get(pool.connection_class, pool.connection_class)
    return aioredis.Redis.from_pool(pool)


class _PackOnce(AbstractConnection):
    """Packs commands with hiredis's `pack_command` (as redis-py's sync connections do).

    redis-py's asyncio connections join per argument and call `Encoder.encode` for each:
    a fifth of the CPU time of a pair's Redis calls. Same bytes on the wire
    (tests/store/test_batch.py); anything hiredis does not take (a memoryview, another
    encoding) goes to redis-py's own packer.
    """

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        """One command as RESP, in one piece."""
        encoder = self.encoder
        if encoder.encoding == "utf-8" and encoder.encoding_errors == "strict":
            first = args[0]
            # "SCRIPT LOAD" goes on the wire as two words, as redis-py sends it
            if (isinstance(first, str) and " " in first) or (
                isinstance(first, bytes) and b" " in first
            ):
                args = (*first.split(), *args[1:])
            try:
                return [_hiredis_pack(args)]
            except TypeError:
                pass
        return super().pack_command(*args)

    def pack_commands(self, commands: Iterable[Iterable[EncodableT]]) -> list[bytes]:
        """Several commands in one piece."""
        return [b"".join([chunk for args in commands for chunk in self.pack_command(*args)])]


class _PackOnceConnection(_PackOnce, Connection):
    pass


class _PackOnceSSLConnection(_PackOnce, SSLConnection):
    pass


class _PackOnceUnixConnection(_PackOnce, UnixDomainSocketConnection):
    pass


_PACK_ONCE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _PackOnceConnection,
    SSLConnection: _PackOnceSSLConnection,
    UnixDomainSocketConnection: _PackOnceUnixConnection,
}


def _get_connection_args(pool: aioredis.ConnectionPool) -> tuple[str, ...]:
    """What `pool.get_connection` takes: nothing, or a command name in older redis-py.

    redis-py 5.2 requires the (unused) name; later versions warn when it is given.
    """
    param = inspect.signature(pool.get_connection).parameters.get("command_name")
    return ("PIPELINE",) if param is not None and param.default is param.empty else ()


def _client_limits(client: aioredis.Redis) -> tuple[float | None, int]:
    """(socket timeout in seconds or None, connections per pool or per cluster node)."""
    if isinstance(client, RedisCluster):
        kwargs = client.nodes_manager.connection_kwargs
        return kwargs.get("socket_timeout"), int(kwargs.get("max_connections") or 2**31 - 1)
    pool = client.connection_pool
    return pool.connection_kwargs.get("socket_timeout"), int(pool.max_connections)


def _raised_by_redis_py(exc: BaseException) -> bool:
    """Whether the innermost frame of `exc`'s traceback is in the redis package."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return isinstance(module, str) and (module == "redis" or module.startswith("redis."))


def _call_name(call: ScriptCall | RawCall) -> str:
    return call.name if isinstance(call, ScriptCall) else str(call.args[0])


def ceil_s(ms: int) -> int:
    """Milliseconds as whole seconds, rounded up, at least 1 (for `retry_after_s`)."""
    return max(1, -(-int(ms) // MS_PER_S))


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One Lua script call: the script's name, its KEYS and its ARGV."""

    name: str
    keys: tuple[str, ...]
    args: tuple[str | int | float, ...]


@dataclass(frozen=True, slots=True)
class RawCall:
    """One plain Redis command (its first argument after the name is its key)."""

    args: tuple[str | int | float, ...]


Call = ScriptCall | RawCall


UNREACHABLE_LOG_S = 1.0
"""While Redis is away, one `redis unreachable` line per this many seconds, not per call."""


class WarnEvery:
    """A warning logged at most once per `interval_s`, saying how many it stands for.

    An outage fails every call in flight; one line per call would flood the log (one per
    request, thousands a second).
    """

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._next = 0.0
        self._held = 0

    def warn(self, message: str, *args: object) -> None:
        """Log `message % args` unless one was logged less than `interval_s` ago."""
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            log.warning(message + " (and %d more like it)", *args, self._held)
        else:
            log.warning(message, *args)
        self._held = 0
        self._next = now + self.interval_s


class Transport:
    """Round trips to Redis for the store's aggregates: calls, batches, scripts, errors.

    Subclasses name their Lua scripts in `script_names`; they are registered here and run
    by EVALSHA (`call`, `batch`).

    Args:
        client: a redis-py asyncio client with `decode_responses=True`.
        keys: key templates (prefix from `PAIRING_KEY_PREFIX`).
    """

    script_names: ClassVar[tuple[str, ...]] = ()
    """The scripts (store/lua/<name>.lua) this store runs."""

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self.client = client
        self.keys = keys
        self.round_trips = 0
        """Redis round trips made so far (a pipeline counts as one), for benchmarks."""
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_script_source(name)) for name in self.script_names
        }
        self._cluster = isinstance(client, RedisCluster)
        self._pool_args = () if self._cluster else _get_connection_args(client.connection_pool)
        timeout_s, max_connections = _client_limits(client)
        self._deadline_s = None if timeout_s is None else call_deadline_s(timeout_s)
        # redis-py's cluster nodes raise MaxConnectionsError instead of waiting: no more
        # calls run at once than a node holds connections (a call uses one at a time).
        self._slots = asyncio.Semaphore(max_connections) if self._cluster else None
        self._unreachable = WarnEvery(UNREACHABLE_LOG_S)
        self.pipeline = Coalescer(self._exchange)
        """Where the batches of concurrent requests share round trips (single Redis)."""

    async def aclose(self) -> None:
        """Stop the exchanges still running and close the connection pool."""
        await self.pipeline.aclose()
        await self.client.aclose()

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        """Await one store call within its deadline; Redis errors become domain errors.

        The deadline (`call_deadline_s`) covers the wait for a connection (a cluster
        slot) and everything redis-py does underneath; past it the call is cancelled
        (redis-py drops a connection cancelled mid-reply) and Redis counts as unavailable.

        Raises:
            StoreUnavailable: Redis is unreachable, or the call outlived its deadline.
            InternalError: Redis refused the call.
        """
        self.round_trips += 1
        try:
            async with asyncio.timeout(self._deadline_s):
                if self._slots is None:
                    return await awaitable
                async with self._slots:
                    return await awaitable
        except _UNAVAILABLE as exc:  # TimeoutError (the deadline) is an OSError
            self._unreachable.warn("redis unreachable: %s", type(exc).__name__)
            raise StoreUnavailable(retry_after_s=UNAVAILABLE_RETRY_S) from None
        except RedisClusterException as exc:
            if "slot" in str(exc):  # keys of several slots in one call: a bug, not an outage
                log.error("redis cluster refused a call: %s", exc)  # noqa: TRY400
                raise InternalError from None
            self._unreachable.warn("redis cluster unreachable: %s", type(exc).__name__)
            raise StoreUnavailable(retry_after_s=UNAVAILABLE_RETRY_S) from None
        except RedisError as exc:
            log.error("redis error: %s", type(exc).__name__)  # noqa: TRY400 - no traceback in logs
            raise InternalError from None
        except AttributeError as exc:
            if not (self._cluster and _raised_by_redis_py(exc)):
                raise
            # redis-py's cluster client, during a failover, now and then reads a
            # connection another task has just reset ('NoneType' object has no
            # attribute ...): the node is going away, not a bug of the call.
            self._unreachable.warn("redis cluster unreachable: %s", "AttributeError in redis-py")
            raise StoreUnavailable(retry_after_s=UNAVAILABLE_RETRY_S) from None
        finally:
            if inspect.iscoroutine(awaitable):
                awaitable.close()  # never awaited when the deadline came first; else a no-op

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:  # noqa: ANN401
        return await self._guard(self._evalsha(name, keys, args))

    async def _evalsha(
        self, name: str, keys: Sequence[str], args: Sequence[str | int | float]
    ) -> Any:  # noqa: ANN401
        script = self._scripts[name]
        if not self._cluster:
            try:
                return await self._one(("EVALSHA", script.sha, len(keys), *keys, *args))
            except NoScriptError:
                # Not loaded (restart, failover, SCRIPT FLUSH): EVAL sends the source, and
                # Redis keeps it for the next EVALSHA. In the shared exchange like every
                # call: a burst that finds the cache empty takes no extra connections.
                source = cast(str, script.script)
                return await self._one(("EVAL", source, len(keys), *keys, *args))
        try:
            # redis-py loads the script after a NOSCRIPT and runs EVALSHA once more
            return await script(keys=list(keys), args=list(args))
        except NoScriptError:
            # Flushed again while reloading (SCRIPT FLUSH, failover): EVAL sends the
            # source itself, so it cannot miss.
            source = cast(str, script.script)
            return await self.client.eval(source, len(keys), *keys, *args)

    async def _one(self, command: tuple[str | int | float, ...]) -> Any:  # noqa: ANN401
        """One command in the next shared exchange; an error reply is raised."""
        (res,) = await self.pipeline.run((command,))
        if isinstance(res, ResponseError):
            raise res
        return res

    async def _exchange(self, commands: Sequence[tuple[str | int | float, ...]]) -> list[Any]:
        """Commands in one write on one pooled connection (single Redis); replies in order.

        What redis-py's non-transactional pipeline does, without its per-command
        bookkeeping (a third of the CPU time of a batch): the connection packs the
        commands, (re)connects and health-checks as usual and times out each read; the
        client's response callbacks shape the replies; an error reply takes its command's
        place in the list; on a connection error or timeout the connection is dropped and
        the exchange retried as the connection's retry policy says, as a pipeline is.
        """
        pool = self.client.connection_pool
        conn = await pool.get_connection(*self._pool_args)  # type: ignore[no-untyped-call]
        try:
            return await conn.retry.call_with_retry(  # type: ignore[no-any-return]
                lambda: self._send_and_read(conn, commands),
                lambda _error: conn.disconnect(),
            )
        finally:
            await pool.release(conn)

    async def _send_and_read(
        self, conn: AbstractConnection, commands: Sequence[tuple[str | int | float, ...]]
    ) -> list[Any]:
        # One timeout for the whole exchange, not one per reply (redis-py wraps every
        # read, and every write in a Task, when the connection has a socket timeout):
        # the connection is ours until released, so its timeout is lifted meanwhile.
        timeout = conn.socket_timeout
        conn.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                return await self._exchange_on(conn, commands)
        except TimeoutError:
            await conn.disconnect(nowait=True)  # a reply may still be on its way
            raise RedisTimeoutError("Timeout reading from Redis") from None
        except asyncio.CancelledError:
            await conn.disconnect(nowait=True)  # likewise (the call's deadline, a stop)
            raise
        finally:
            conn.socket_timeout = timeout

    async def _exchange_on(
        self, conn: AbstractConnection, commands: Sequence[tuple[str | int | float, ...]]
    ) -> list[Any]:
        await conn.send_packed_command(conn.pack_commands(commands))
        callbacks = self.client.response_callbacks
        out: list[Any] = []
        for command in commands:
            try:
                res = await conn.read_response()
            except ResponseError as exc:
                out.append(exc)
                continue
            callback = callbacks.get(str(command[0]))
            out.append(res if callback is None else callback(res))
        return out

    async def call(self, call: Call) -> Any:  # noqa: ANN401
        """Run one call in its own round trip.

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: Redis refused the call.
        """
        if isinstance(call, ScriptCall):
            return await self._run(call.name, call.keys, call.args)
        if self._cluster:
            return await self._guard(self.client.execute_command(*call.args))  # type: ignore[no-untyped-call]
        return await self._guard(self._one(call.args))

    async def batch(self, calls: Sequence[Call]) -> list[Any]:
        """Run calls in one round trip.

        On a single Redis: the commands in order, back to back, in the next exchange
        shared with the batches of other requests (`pipelining.Coalescer`, `_exchange`),
        scripts by EVALSHA (reloaded after NOSCRIPT). On a cluster: concurrent calls (its
        pipelines refuse EVALSHA, and calls on different slots have no order anyway).

        Returns:
            The results in call order.

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: Redis refused one of the calls.
        """
        if not calls:
            return []
        if self._cluster:
            return list(await asyncio.gather(*(self.call(c) for c in calls)))
        scripts = self._scripts
        commands = [
            ("EVALSHA", scripts[c.name].sha, len(c.keys), *c.keys, *c.args)
            if isinstance(c, ScriptCall)
            else c.args
            for c in calls
        ]
        results = await self._guard(self.pipeline.run(commands))
        for i, res in enumerate(results):
            if isinstance(res, NoScriptError):
                results[i] = await self.call(calls[i])  # loads the script, runs it once
            elif isinstance(res, RedisError):
                log.error("redis refused %s: %s", _call_name(calls[i]), type(res).__name__)
                raise InternalError
        return results

    async def ping(self) -> bool:
        """True when Redis answers PING.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return bool(await self._guard(self.client.ping()))
