"""PairingStore: every check-and-change of the service as one Lua script on one hash tag.

Scripts live in `lua/` beside this module, each with its `KEYS`/`ARGV` contract at the
top; `_prelude.lua` (Redis time in ms) is prepended to each. They are sent once and run
by EVALSHA; redis-py reloads a script after `NOSCRIPT` (restart, failover, SCRIPT FLUSH).
Redis errors are turned into domain errors here and nowhere else: connection problems and
timeouts become `StoreUnavailable`, anything else `InternalError`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypeVar, cast

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

from mqtt_pairing import policy
from mqtt_pairing.codes import code_group
from mqtt_pairing.errors import (
    Banned,
    CodeAlreadyUsed,
    CodeExpired,
    CodeNotFound,
    InternalError,
    RateLimited,
    RunnerOffline,
    SessionLimitReached,
    StoreUnavailable,
)
from mqtt_pairing.models import ClosedReason, PairingHistoryEntry, PairingSession
from mqtt_pairing.store.keys import MS_PER_S, KeySchema, glob_escape
from mqtt_pairing.tombstones import FINGERPRINT_HEX, TombstoneLayout

PRESENCE_ANNOUNCE_MAX = 4
"""Presence changes announced at most per window per runner (`PAIRING_PRESENCE_ANNOUNCE_MAX`)."""
PRESENCE_ANNOUNCE_WINDOW_S = 60
"""That window, s (`PAIRING_PRESENCE_ANNOUNCE_WINDOW_S`)."""

_hiredis_pack = cast("Callable[[tuple[EncodableT, ...]], bytes]", hiredis.pack_command)

log = logging.getLogger(__name__)

T = TypeVar("T")
Kind = Literal["runner", "app"]

SCRIPT_NAMES = (
    "begin_request",
    "finish_request",
    "reserve_budget",
    "issue_code",
    "add_tombstone",
    "find_tombstone",
    "set_runner_code",
    "clear_runner_code",
    "end_code",
    "claim_code",
    "unclaim_code",
    "open_session",
    "close_sessions",
    "touch_sessions",
    "active_session",
    "set_ban",
    "heartbeat",
    "record_status",
    "expire_session",
    "ack_outbox",
    "mark_due",
    "claim_due",
    "append_history",
    "settle_claim",
    "hold_lease",
)
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

SESSION_KEYS_MARGIN_S = 86_400
"""Every key of a session lives this much longer than the session's idle deadline.

The expiry sweep acts at the deadline (last_seen_at + idle TTL) and reads the runner's
sessions hash and runner hash, then the app's index and the by-id lookup; a key whose TTL
were the idle TTL itself would vanish at that very moment, and the session with it,
without a `session.closed`. The margin lets a sweep that runs late (every instance down,
a failover) still close the session; closed sessions are deleted outright, so the margin
holds memory only for keys nothing closes."""


def session_keys_ttl_ms(idle_ttl_s: int) -> int:
    """TTL of the keys of a session refreshed now (idle TTL plus the margin), ms."""
    return (idle_ttl_s + SESSION_KEYS_MARGIN_S) * MS_PER_S


OUTBOX_DUE_TTL_S = 86_400
"""TTL of an outbox-due set, refreshed by every mark (marks are handled within seconds)."""

CLAIM_IN_FLIGHT_S = 2.0
"""How long a claimed use may still be given back by the pair that holds it (its session
refused); a claim on a used-up code waits that long at most before CODE_ALREADY_USED."""
_CLAIM_RETRY_S = 0.02
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


def _ceil_s(ms: int) -> int:
    return max(1, -(-int(ms) // MS_PER_S))


@dataclass(frozen=True, slots=True)
class Begin:
    """Outcome of `begin_request` that lets the request go on."""

    allowlisted: bool
    now_ms: int
    takeover: bool


@dataclass(frozen=True, slots=True)
class Replay:
    """The request was answered before: its remembered reply (as stored)."""

    reply: str


@dataclass(frozen=True, slots=True)
class Pending:
    """A copy of the request is being handled elsewhere right now."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The request_id was used before with another payload."""


@dataclass(frozen=True, slots=True)
class Claim:
    """A use of a code taken for (app_id, request_id)."""

    runner_id: str
    session_id: str
    uses_left: int
    max_uses: int
    repeat: bool
    first_char: str


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One event waiting in a runner's outbox (see `services.outbox.render`).

    Attributes:
        stream_id: the entry's id in the runner's outbox stream.
        runner_id: whose outbox it is in.
        type: the event: session.opened, session.closed, code.used, runner.online, ...
        session: the session it is about (internal JSON form), or None.
        extra: further fields (e.g. uses_left, app_public_key, the sessions to notify).
        at_ms: when it happened, ms (Redis time).
    """

    stream_id: str
    runner_id: str
    type: str
    session: PairingSession | None
    extra: dict[str, Any]
    at_ms: int


def parse_outbox(runner_id: str, raw: Sequence[Any]) -> list[OutboxEntry]:
    """Entries as XRANGE returns them (`[[id, [field, value, ...]], ...]`)."""
    out: list[OutboxEntry] = []
    for stream_id, fields in raw:
        if isinstance(fields, dict):
            data = fields
        else:
            data = dict(zip(fields[::2], fields[1::2], strict=True))
        out.append(
            OutboxEntry(
                stream_id=str(stream_id),
                runner_id=runner_id,
                type=str(data.get("t", "")),
                session=_session(data["s"]) if data.get("s") else None,
                extra=json.loads(data.get("x") or "{}"),
                at_ms=int(data.get("at") or 0),
            )
        )
    return out


@dataclass(frozen=True, slots=True)
class OpenedSession:
    """A session opened (or found again) in the runner's slot."""

    session: PairingSession
    replaced: PairingSession | None
    runner_name: str | None
    runner_public_key: str | None
    runner_metadata: dict[str, Any] | None
    repeat: bool
    outbox: list[OutboxEntry]


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


class ClaimBusy(Exception):
    """The code is used up but a recent claim may still be given back: ask again."""


def _session(raw: str) -> PairingSession:
    return PairingSession.model_validate_json(raw)


class PairingStore:
    """Domain verbs over Redis; every multi-step change is one Lua script.

    Args:
        client: a redis-py asyncio client with `decode_responses=True`.
        keys: key templates (prefix from `PAIRING_KEY_PREFIX`).
    """

    def __init__(self, client: aioredis.Redis, keys: KeySchema) -> None:
        self.client = client
        self.keys = keys
        self.round_trips = 0
        """Redis round trips made so far (a pipeline counts as one), for benchmarks."""
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script(load_script_source(name)) for name in SCRIPT_NAMES
        }
        self._cluster = isinstance(client, RedisCluster)
        self._pool_args = () if self._cluster else _get_connection_args(client.connection_pool)
        timeout_s, max_connections = _client_limits(client)
        self._deadline_s = None if timeout_s is None else call_deadline_s(timeout_s)
        # redis-py's cluster nodes raise MaxConnectionsError instead of waiting: no more
        # calls run at once than a node holds connections (a call uses one at a time).
        self._slots = asyncio.Semaphore(max_connections) if self._cluster else None

    async def aclose(self) -> None:
        """Close the connection pool."""
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
            log.warning("redis unreachable: %s", type(exc).__name__)
            raise StoreUnavailable(retry_after_s=UNAVAILABLE_RETRY_S) from None
        except RedisClusterException as exc:
            if "slot" in str(exc):  # keys of several slots in one call: a bug, not an outage
                log.error("redis cluster refused a call: %s", exc)  # noqa: TRY400
                raise InternalError from None
            log.warning("redis cluster unreachable: %s", type(exc).__name__)
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
            log.warning("redis cluster unreachable: AttributeError in redis-py")
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
                pass  # not loaded (restart, failover, SCRIPT FLUSH): as on a cluster
        try:
            # redis-py loads the script after a NOSCRIPT and runs EVALSHA once more
            return await script(keys=list(keys), args=list(args))
        except NoScriptError:
            # Flushed again while reloading (SCRIPT FLUSH, failover): EVAL sends the
            # source itself, so it cannot miss.
            source = cast(str, script.script)
            return await self.client.eval(source, len(keys), *keys, *args)

    async def _one(self, command: tuple[str | int | float, ...]) -> Any:  # noqa: ANN401
        """One command by `_exchange`; an error reply is raised."""
        (res,) = await self._exchange((command,))
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

        On a single Redis: one write of all the commands (see `_exchange`), in order,
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
        results = await self._guard(self._exchange(commands))
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

    # ---- requests: idempotency and limits -------------------------------------------

    async def begin_request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        payload_hash: str,
        **options: Any,  # noqa: ANN401 - as begin_call
    ) -> Begin | Replay | Pending | Mismatch:
        """Replay check, admin ban, penalty and request rate, then the pending mark.

        Keyword arguments as `begin_call`.

        Raises:
            Banned: an admin ban is in force (`retry_after_s` unless permanent).
            RateLimited: a penalty or the request rate (`retry_after_s` set).
            StoreUnavailable: Redis is unreachable.
        """
        call = self.begin_call(kind, ident, op, request_id, payload_hash, **options)
        return self.parse_begin(await self.call(call))

    def begin_call(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        payload_hash: str,
        *,
        member: str,
        lease_s: int,
        dedupe_ttl_s: int,
        check_ban: bool,
        check_penalty: bool,
        request_limit: int = 0,
        request_window_s: int = 60,
    ) -> ScriptCall:
        """The `begin_request` call: replay check, ban, penalty, request rate, pending mark.

        Its result goes to `parse_begin`.
        """
        k = self.keys
        return ScriptCall(
            "begin_request",
            (
                k.dedupe(kind, ident, op, request_id),
                k.ban(kind, ident),
                k.allow(kind, ident),
                k.limit(kind, ident),
                k.limit_requests(kind, ident),
            ),
            (
                payload_hash,
                lease_s * MS_PER_S,
                dedupe_ttl_s * MS_PER_S,
                int(check_ban),
                int(check_penalty),
                request_limit,
                request_window_s * MS_PER_S,
                member,
            ),
        )

    @staticmethod
    def parse_begin(res: Any) -> Begin | Replay | Pending | Mismatch:  # noqa: ANN401
        """The outcome of a `begin_request` call.

        Raises:
            Banned: an admin ban is in force (`retry_after_s` unless permanent).
            RateLimited: a penalty or the request rate (`retry_after_s` set).
        """
        status = res[0]
        if status == "ok":
            return Begin(allowlisted=bool(res[1]), now_ms=int(res[2]), takeover=bool(res[3]))
        if status == "replay":
            return Replay(reply=res[1])
        if status == "pending":
            return Pending()
        if status == "mismatch":
            return Mismatch()
        if status == "banned":
            retry = int(res[1])
            raise Banned(retry_after_s=None if retry < 0 else _ceil_s(retry))
        if status == "limited":
            raise RateLimited(retry_after_s=_ceil_s(int(res[1])))
        raise InternalError

    async def finish_request(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        **options: Any,  # noqa: ANN401 - as finish_call
    ) -> tuple[int, int]:
        """Remember the reply and record the outcome of a request (see `finish_call`).

        Returns:
            (penalty_s, strikes): the automatic penalty this failure started (0 if none).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        call = self.finish_call(kind, ident, op, request_id, **options)
        return self.parse_finish(await self.call(call))

    def finish_call(
        self,
        kind: Kind,
        ident: str,
        op: str,
        request_id: str,
        *,
        reply: str | None,
        dedupe_ttl_s: int,
        outcome: Literal["", "failure", "success"] = "",
        allowlisted: bool = False,
        fail_limit: int = 5,
        fail_window_s: int = 60,
        penalty_s: int = 300,
        penalty_max_s: int = 86_400,
        penalty_memory_s: int = 86_400,
        member: str = "",
        idle_ttl_s: int = 2_592_000,
    ) -> ScriptCall:
        """The `finish_request` call: remember the reply and record the outcome.

        Drops the pending mark instead when `reply` is None; records a failed guess (with
        the doubling penalty) or clears the failure window after a success. (The same
        script indexes a session under its app: `app_index_call`.)

        Its result goes to `parse_finish`.
        """
        k = self.keys
        return ScriptCall(
            "finish_request",
            (
                k.dedupe(kind, ident, op, request_id),
                k.limit(kind, ident),
                k.limit_failures(kind, ident),
                # Only an app has a session index; a runner passes a key of its own tag
                # that the script leaves alone (it writes the index only for a session).
                k.app_sessions(ident) if kind == "app" else k.limit(kind, ident),
            ),
            (
                "forget" if reply is None else "remember",
                reply or "",
                dedupe_ttl_s * MS_PER_S,
                outcome,
                int(allowlisted),
                fail_limit,
                fail_window_s * MS_PER_S,
                penalty_s * MS_PER_S,
                penalty_max_s * MS_PER_S,
                penalty_memory_s * MS_PER_S,
                member,
                "",  # the app index: see app_index_call
                "",
                "",
                session_keys_ttl_ms(idle_ttl_s),
            ),
        )

    @staticmethod
    def parse_finish(res: Any) -> tuple[int, int]:  # noqa: ANN401
        """(penalty_s, strikes): the automatic penalty a failure started (0 if none)."""
        penalty_ms, strikes = int(res[0]), int(res[1])
        return (_ceil_s(penalty_ms) if penalty_ms else 0), strikes

    def budget_call(
        self, member: str, *, limit: int, window_s: int, shards: int, peek: bool = False
    ) -> ScriptCall:
        """The `reserve_budget` call for one unit of the global failure budget.

        The budget is sharded over `shards` keys ({global:<n>}); each shard allows
        `limit // shards` units (at least 1) per window. Its result goes to `parse_budget`.
        """
        shard = self.keys.budget_shard(member, shards)
        per_shard = max(1, limit // shards)
        return ScriptCall(
            "reserve_budget",
            (self.keys.budget(shard),),
            (member, per_shard, window_s * MS_PER_S, "peek" if peek else "reserve"),
        )

    @staticmethod
    def parse_budget(res: Any) -> bool:  # noqa: ANN401
        """True if a unit was reserved by this call (False: already held, or a peek).

        Raises:
            RateLimited: the budget is spent (`retry_after_s` until a unit frees).
        """
        if int(res[0]) != 1:
            raise RateLimited("too many failed attempts overall", retry_after_s=_ceil_s(res[1]))
        return bool(int(res[1])) if len(res) > 1 else False

    async def reserve_budget(
        self, member: str, *, limit: int, window_s: int, shards: int, peek: bool = False
    ) -> bool:
        """Reserve one unit of the global failure budget (or only check it, `peek`).

        Returns:
            True if this call reserved the unit.

        Raises:
            RateLimited: the budget is spent (`retry_after_s` until a unit frees).
            StoreUnavailable: Redis is unreachable.
        """
        call = self.budget_call(member, limit=limit, window_s=window_s, shards=shards, peek=peek)
        return self.parse_budget(await self.call(call))

    def refund_call(self, member: str, *, shards: int) -> RawCall:
        """The ZREM that gives back the budget unit of `member`."""
        shard = self.keys.budget_shard(member, shards)
        return RawCall(("ZREM", self.keys.budget(shard), member))

    async def refund_budget(self, member: str, *, shards: int) -> None:
        """Give back the unit reserved by `member` (after a success).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        shard = self.keys.budget_shard(member, shards)
        await self._guard(self.client.zrem(self.keys.budget(shard), member))

    # ---- codes ------------------------------------------------------------------------

    async def issue_code(
        self,
        digest: str,
        runner_id: str,
        *,
        max_uses: int,
        ttl_s: int,
        first_char: str,
    ) -> tuple[int, int] | None:
        """Create a code under `digest`; its hash lives `ttl_s` seconds.

        Returns:
            (created_ms, expires_ms), or None if the digest is taken (draw again).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "issue_code",
            [self.keys.code(digest)],
            [runner_id, max_uses, ttl_s * MS_PER_S, first_char],
        )
        if int(res[0]) != 1:
            return None
        return int(res[1]), int(res[2])

    def tombstone_call(self, layout: TombstoneLayout, digest: str, expires_ms: int) -> ScriptCall:
        """The `add_tombstone` call: the record that answers `CODE_EXPIRED` after expiry.

        Written with the code's issue (`mqtt_pairing.tombstones`); its result (the
        string's length, bytes) is of no use to the caller.
        """
        place = layout.place(digest, expires_ms)
        return ScriptCall(
            "add_tombstone",
            (self.keys.tombstones(place.group, place.window, place.bucket),),
            (place.fingerprint, place.offset, place.expire_at_ms),
        )

    def _tombstone_lookup(
        self, layout: TombstoneLayout, digest: str, now_ms: int
    ) -> tuple[tuple[str, ...], tuple[str | int, ...]]:
        """The KEYS and ARGV of a tombstone lookup (`tombstone_expired`, _prelude.lua).

        `now_ms` is this process's clock: which windows to read; the script decides with
        Redis time.
        """
        group, windows = code_group(digest), layout.lookup_windows(now_ms)
        bucket = layout.bucket(digest)
        keys = tuple(self.keys.tombstones(group, w, bucket) for w in windows)
        args = (digest[FINGERPRINT_HEX], layout.window_ms, layout.tombstone_ms, *windows)
        return keys, args

    def find_tombstone_call(self, layout: TombstoneLayout, digest: str, now_ms: int) -> ScriptCall:
        """The `find_tombstone` call for a code whose hash may be gone; see `parse_tombstone`.

        (`claim_code` answers the same by itself; this is for tests and benchmarks.)
        """
        keys, args = self._tombstone_lookup(layout, digest, now_ms)
        return ScriptCall("find_tombstone", keys, args)

    @staticmethod
    def parse_tombstone(res: Any) -> bool:  # noqa: ANN401
        """True if the code expired within the tombstone time (`CODE_EXPIRED`)."""
        return int(res) == 1

    async def find_tombstone(self, layout: TombstoneLayout, digest: str, now_ms: int) -> bool:
        """True if the code of `digest` expired within the tombstone time.

        False when tombstones are off.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not layout.enabled:
            return False
        return self.parse_tombstone(
            await self.call(self.find_tombstone_call(layout, digest, now_ms))
        )

    def set_runner_code_call(
        self,
        runner_id: str,
        digest: str,
        *,
        expires_ms: int,
        code_ttl_s: int,
        idle_ttl_s: int,
        request_id: str,
        sealed_reply: str,
        dedupe_ttl_s: int,
        name: str | None,
        public_key: str | None,
        metadata: dict[str, Any] | None,
        max_uses: int = 1,
    ) -> ScriptCall:
        """The `set_runner_code` call: make `digest` the runner's active code.

        It also remembers the sealed reply; its result goes to `parse_set_runner_code`.
        `max_uses` is kept with it: the runner's slot counts the sessions opened with the
        code, which says whether a cancel found it live (`cancel_code`).
        """
        return ScriptCall(
            "set_runner_code",
            (
                self.keys.runner(runner_id),
                self.keys.dedupe("runner", runner_id, "code", request_id),
            ),
            (
                digest,
                expires_ms,
                # the runner hash holds the code until it expires, and its sessions' data
                session_keys_ttl_ms(max(idle_ttl_s, code_ttl_s)),
                sealed_reply,
                dedupe_ttl_s * MS_PER_S,
                name or "",
                public_key or "",
                json.dumps(metadata, separators=(",", ":")) if metadata is not None else "",
                max_uses,
            ),
        )

    @staticmethod
    def parse_set_runner_code(res: Any) -> str | None:  # noqa: ANN401
        """The digest of the code that `set_runner_code` replaced, or None."""
        return str(res) if res else None

    async def clear_runner_code(self, runner_id: str) -> tuple[str, bool | None] | None:
        """Forget the runner's active code.

        Returns:
            None if the runner had no active code, else (its digest, whether it was live:
            not expired and fewer sessions opened with it than its uses; None when the
            runner hash does not say, see `cancel_code`).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        old, live = await self._run("clear_runner_code", [self.keys.runner(runner_id)], [])
        if not old:
            return None
        return str(old), None if int(live) < 0 else int(live) == 1

    async def cancel_code(self, runner_id: str) -> bool:
        """Cancel the runner's active code (`cancel-code`, admin revoke); True if it was live.

        Two steps (docs/operations.md "cancel-code, admin codes revoke, runner ban"): the
        runner's slot forgets the code, then the code's slot marks it cancelled. The
        runner's slot decides the answer: a pair's session opens there only while the
        code is the runner's, so a pair racing the cancel either opened first (its use is
        spent: a single-use code was not live any more) or is refused after
        (CODE_ALREADY_USED, and its use is not counted), whatever the code's slot says of
        uses claimed but not yet given back. Exactly one of the two wins
        (docs/protocol.md "Other ops").

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        cleared = await self.clear_runner_code(runner_id)
        if cleared is None:
            return False
        digest, live = cleared
        ended = await self.end_code(digest, runner_id, "cancelled")
        return ended if live is None else live

    async def end_code(
        self, digest: str, runner_id: str, state: Literal["replaced", "cancelled"]
    ) -> bool:
        """Mark a code replaced or cancelled; True if it was live until now.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run("end_code", [self.keys.code(digest)], [state, runner_id])
        return int(res) == 1

    def claim_call(
        self,
        digest: str,
        app_id: str,
        request_id: str,
        session_id: str,
        tombstones: TombstoneLayout | None = None,
    ) -> ScriptCall:
        """The `claim_code` call; its result goes to `parse_claim`.

        With `tombstones` (enabled), a code whose hash is gone answers `CODE_EXPIRED` from
        its group's tombstone strings, in the same script.
        """
        keys: tuple[str, ...] = (self.keys.code(digest), self.keys.code_claims(digest))
        args: tuple[str | int, ...] = (
            f"{app_id}\n{request_id}",
            session_id,
            int(CLAIM_IN_FLIGHT_S * MS_PER_S),
        )
        if tombstones is not None and tombstones.enabled:
            t_keys, t_args = self._tombstone_lookup(tombstones, digest, int(time.time() * 1000))
            keys, args = keys + t_keys, args + t_args
        return ScriptCall("claim_code", keys, args)

    @staticmethod
    def parse_claim(res: Any) -> Claim:  # noqa: ANN401
        """The outcome of a `claim_code` call.

        Raises:
            CodeNotFound, CodeExpired, CodeAlreadyUsed: the lookup failed.
            ClaimBusy: used up, but a claim in flight may still be given back.
        """
        status = res[0]
        if status == "ok":
            return Claim(
                runner_id=res[1],
                session_id=res[2],
                uses_left=int(res[3]),
                max_uses=int(res[4]),
                repeat=bool(int(res[5])),
                first_char=res[6] or "?",
            )
        if status == "expired":
            raise CodeExpired
        if status == "used":
            raise CodeAlreadyUsed
        if status == "busy":
            raise ClaimBusy
        raise CodeNotFound

    async def claim_code(
        self,
        digest: str,
        app_id: str,
        request_id: str,
        session_id: str,
        tombstones: TombstoneLayout | None = None,
    ) -> Claim:
        """Take one use of the code for (app_id, request_id); a repeat returns the same.

        A used-up code with a claim in flight is asked again until that claim is settled
        (at most `CLAIM_IN_FLIGHT_S`).

        Raises:
            CodeNotFound, CodeExpired, CodeAlreadyUsed: the lookup failed.
            StoreUnavailable: Redis is unreachable.
        """
        deadline = asyncio.get_running_loop().time() + CLAIM_IN_FLIGHT_S
        while True:
            # Built anew each time: the tombstone windows follow the clock.
            call = self.claim_call(digest, app_id, request_id, session_id, tombstones)
            try:
                return self.parse_claim(await self.call(call))
            except ClaimBusy:
                if asyncio.get_running_loop().time() > deadline:
                    raise CodeAlreadyUsed from None
                await asyncio.sleep(_CLAIM_RETRY_S)

    def settle_claim_call(self, digest: str, app_id: str, request_id: str) -> ScriptCall:
        """The `settle_claim` call: the claimed use's session opened; it stays used."""
        return ScriptCall(
            "settle_claim", (self.keys.code_claims(digest),), (f"{app_id}\n{request_id}",)
        )

    def unclaim_call(self, digest: str, app_id: str, request_id: str) -> ScriptCall:
        """The `unclaim_code` call (gives back a use)."""
        return ScriptCall(
            "unclaim_code",
            (self.keys.code(digest), self.keys.code_claims(digest)),
            (f"{app_id}\n{request_id}",),
        )

    async def unclaim_code(self, digest: str, app_id: str, request_id: str) -> bool:
        """Give back the use taken for (app_id, request_id); True if one was given back.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "unclaim_code",
            [self.keys.code(digest), self.keys.code_claims(digest)],
            [f"{app_id}\n{request_id}"],
        )
        return int(res) == 1

    # ---- sessions ---------------------------------------------------------------------

    async def open_session(self, *, runner_id: str, **options: Any) -> OpenedSession:  # noqa: ANN401
        """Open the session of a claimed use in the runner's slot (see `open_call`).

        Raises:
            CodeAlreadyUsed: the code is no longer the runner's active code.
            RunnerOffline: the runner is known to be offline.
            SessionLimitReached: the runner has `max_sessions` active sessions.
            StoreUnavailable: Redis is unreachable.
        """
        call = self.open_call(runner_id=runner_id, **options)
        return self.parse_open(runner_id, await self.call(call))

    def open_call(
        self,
        *,
        digest: str,
        session_id: str,
        runner_id: str,
        app_id: str,
        app_name: str | None,
        idle_ttl_s: int,
        max_sessions: int,
        uses_left: int = 0,
        app_public_key: str | None = None,
        app_metadata: dict[str, Any] | None = None,
    ) -> ScriptCall:
        """The `open_session` call; its result goes to `parse_open`."""
        return ScriptCall(
            "open_session",
            (
                self.keys.runner(runner_id),
                self.keys.runner_sessions(runner_id),
                self.keys.outbox(runner_id),
            ),
            (
                digest,
                session_id,
                runner_id,
                app_id,
                app_name or "",
                session_keys_ttl_ms(idle_ttl_s),
                max_sessions,
                json.dumps({"app_public_key": app_public_key, "app_metadata": app_metadata}),
                uses_left,
            ),
        )

    @staticmethod
    def parse_open(runner_id: str, res: Any) -> OpenedSession:  # noqa: ANN401
        """The outcome of an `open_session` call.

        Raises:
            CodeAlreadyUsed: the code is no longer the runner's active code.
            RunnerOffline: the runner is known to be offline.
            SessionLimitReached: the runner has `max_sessions` active sessions.
        """
        status = res[0]
        if status == "ok":
            return OpenedSession(
                session=_session(res[1]),
                replaced=_session(res[2]) if res[2] else None,
                runner_name=res[3] or None,
                runner_public_key=res[4] or None,
                runner_metadata=json.loads(res[5]) if res[5] else None,
                repeat=bool(int(res[6])),
                outbox=parse_outbox(runner_id, res[7]),
            )
        if status == "offline":
            raise RunnerOffline
        if status == "limit":
            raise SessionLimitReached
        raise CodeAlreadyUsed

    async def close_sessions(
        self,
        runner_id: str,
        *,
        session_id: str | None = None,
        app_id: str | None = None,
        owner_app_id: str | None = None,
        reason: ClosedReason,
    ) -> tuple[list[PairingSession], list[OutboxEntry]]:
        """Close one session, all sessions with one app, or all sessions of a runner.

        Afterwards the app indexes and by-id lookups of the closed sessions are dropped
        (other slots; idempotent, so a crash in between leaves only stale index entries
        that listing cleans up).

        Args:
            runner_id: the runner whose sessions to close.
            session_id: close only this session.
            app_id: close only the sessions with this app.
            owner_app_id: the session must belong to this app (an app closes its own only).
            reason: the closed_reason.

        Returns:
            The closed sessions (state closed, closed_reason set), and the outbox entries
            this call wrote (their session.closed events; not what others wrote there).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if session_id is not None:
            mode, value = "session", session_id
        elif app_id is not None:
            mode, value = "app", app_id
        else:
            mode, value = "all", ""
        res = await self._run(
            "close_sessions",
            [self.keys.runner_sessions(runner_id), self.keys.outbox(runner_id)],
            [mode, value, owner_app_id or "", reason.value],
        )
        closed = [_session(raw) for raw in res[0]]
        await self.drop_session_indexes(closed)
        return closed, parse_outbox(runner_id, res[1])

    async def drop_session_indexes(self, sessions: Sequence[PairingSession]) -> None:
        """Remove closed sessions from their apps' indexes and the by-id lookup.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.batch(self.drop_index_calls(sessions))

    def drop_index_calls(self, sessions: Sequence[PairingSession]) -> list[Call]:
        """The calls that drop closed sessions from their apps' indexes and by-id lookups."""
        return [c for s in sessions for c in self.drop_index_calls_by_id(s.session_id, s.app_id)]

    def drop_index_calls_by_id(self, session_id: str, app_id: str) -> list[Call]:
        """The calls that drop one session from its app's index and its by-id lookup."""
        return [
            RawCall(("HDEL", self.keys.app_sessions(app_id), session_id)),
            RawCall(("DEL", self.keys.session(session_id))),
        ]

    def by_id_call(
        self, session_id: str, runner_id: str, app_id: str, *, idle_ttl_s: int
    ) -> RawCall:
        """The SET of a session's by-id lookup (`session:{session:<id>}`), idle TTL (s)."""
        value = json.dumps({"runner_id": runner_id, "app_id": app_id})
        ttl_s = idle_ttl_s + SESSION_KEYS_MARGIN_S
        return RawCall(("SET", self.keys.session(session_id), value, "EX", ttl_s))

    def app_index_call(
        self, app_id: str, session_id: str, runner_id: str, *, idle_ttl_s: int
    ) -> ScriptCall:
        """Index one session under its app (`finish_request` in its `none` mode).

        The app's index hash (`app-sessions`, field session_id -> runner_id) gets the
        entry and the idle TTL (seconds) plus a margin; nothing else of the request is
        touched. A pair writes it before it opens the session, so that the app finds the
        session as soon as it has the reply; readers drop entries whose session is not
        open (`app_sessions`), so one left by a refused open is harmless.
        """
        k = self.keys
        return ScriptCall(
            "finish_request",
            # KEYS[1..3] are left alone in this mode: any keys of the app's tag do.
            (
                k.limit("app", app_id),
                k.limit("app", app_id),
                k.limit_failures("app", app_id),
                k.app_sessions(app_id),
            ),
            (
                "none",
                "",
                0,
                "",
                0,
                0,
                0,
                0,
                0,
                0,
                "",
                session_id,
                runner_id,
                "",
                session_keys_ttl_ms(idle_ttl_s),
            ),
        )

    async def find_session(self, session_id: str) -> tuple[str, str] | None:
        """(runner_id, app_id) of a session by id, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw = await self._guard(self.client.get(self.keys.session(session_id)))
        if raw is None:
            return None
        data = json.loads(raw)
        return str(data["runner_id"]), str(data["app_id"])

    async def app_session_runner(self, app_id: str, session_id: str) -> str | None:
        """The runner of one of the app's sessions, from the app's index, or None.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        runner = await self._guard(self.client.hget(self.keys.app_sessions(app_id), session_id))
        return str(runner) if runner is not None else None

    async def active_session(
        self, runner_id: str, session_id: str
    ) -> tuple[PairingSession | None, int]:
        """One active session of a runner (read only, nothing refreshed), and Redis time.

        Returns:
            (the session, or None if the runner has no such active session; now in ms).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw, now_ms = await self._run(
            "active_session", [self.keys.runner_sessions(runner_id)], [session_id]
        )
        return (_session(raw) if raw else None), int(now_ms)

    async def runner_sessions(
        self, runner_id: str, *, idle_ttl_s: int, app_id: str = ""
    ) -> list[PairingSession]:
        """Active sessions of a runner (optionally only with one app), refreshed.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "touch_sessions",
            [self.keys.runner_sessions(runner_id), self.keys.runner(runner_id)],
            [session_keys_ttl_ms(idle_ttl_s), app_id],
        )
        return sorted((_session(raw) for raw in res), key=lambda s: s.created_at_ms)

    async def app_sessions(self, app_id: str, *, idle_ttl_s: int) -> list[PairingSession]:
        """Active sessions of an app, refreshed; stale index entries are dropped.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        index: dict[str, str] = await self._guard(
            self.client.hgetall(self.keys.app_sessions(app_id))  # type: ignore[arg-type]
        )
        found: list[PairingSession] = []
        for runner_id in sorted(set(index.values())):
            found.extend(
                await self.runner_sessions(runner_id, idle_ttl_s=idle_ttl_s, app_id=app_id)
            )
        live = {s.session_id for s in found}
        stale = [sid for sid in index if sid not in live]
        if stale:
            await self._guard(self.client.hdel(self.keys.app_sessions(app_id), *stale))
        if found:
            await self._guard(
                self.client.pexpire(self.keys.app_sessions(app_id), session_keys_ttl_ms(idle_ttl_s))
            )
        return sorted(found, key=lambda s: s.created_at_ms)

    # ---- presence -----------------------------------------------------------------------

    def _runner_slot(self, runner_id: str) -> list[str]:
        """KEYS of the runner-slot scripts that may announce presence: hash, sessions, outbox."""
        k = self.keys
        return [k.runner(runner_id), k.runner_sessions(runner_id), k.outbox(runner_id)]

    async def heartbeat(
        self,
        runner_id: str,
        *,
        idle_ttl_s: int,
        heartbeat_online_s: int,
        announce_max: int = PRESENCE_ANNOUNCE_MAX,
        announce_window_s: int = PRESENCE_ANNOUNCE_WINDOW_S,
    ) -> list[OutboxEntry]:
        """Record a runner heartbeat and refresh its sessions.

        A change is announced only within `announce_max` per `announce_window_s` per
        runner (docs/protocol.md "Events"); one held back is announced by a later
        heartbeat.

        Returns:
            The outbox entry the heartbeat wrote if it announced a change (offline to
            online), else an empty list.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "heartbeat",
            self._runner_slot(runner_id),
            [
                session_keys_ttl_ms(idle_ttl_s),
                heartbeat_online_s * MS_PER_S,
                announce_max,
                announce_window_s * MS_PER_S,
            ],
        )
        return parse_outbox(runner_id, res[1])

    async def record_status(
        self,
        runner_id: str,
        state: Literal["online", "offline", ""],
        *,
        retained: bool,
        heartbeat_online_s: int,
        idle_ttl_s: int,
        announce_max: int = PRESENCE_ANNOUNCE_MAX,
        announce_window_s: int = PRESENCE_ANNOUNCE_WINDOW_S,
        held: Callable[[float], object] | None = None,
    ) -> list[OutboxEntry]:
        """Record a runner's status message; announce a change between online and offline.

        At most `announce_max` changes are announced per `announce_window_s` per runner
        (docs/protocol.md "Events"). A change past them is recorded but held back:
        `held(delay_s)` is called with the seconds until the window allows one, when
        the caller calls this again with `state` "" (nothing recorded: the recorded
        presence is announced if it differs from the last announced). A replayed
        retained status (`retained`) that matches the record announces the same way.

        Returns:
            The outbox entry written if presence changed (runner.online/offline), else an
            empty list.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "record_status",
            self._runner_slot(runner_id),
            [
                state,
                int(retained),
                heartbeat_online_s * MS_PER_S,
                session_keys_ttl_ms(idle_ttl_s),
                announce_max,
                announce_window_s * MS_PER_S,
            ],
        )
        if held is not None and len(res) > 2 and int(res[2]) > 0:
            held(int(res[2]) / MS_PER_S)
        return parse_outbox(runner_id, res[1])

    async def presence(
        self, runner_ids: Sequence[str], *, heartbeat_online_s: int = 30
    ) -> dict[str, bool | None]:
        """Presence of runners by docs/protocol.md "Presence" (True, False, or None: unknown).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        if not runner_ids:
            return {}
        secs, micros = await self._guard(self.client.time())
        now = int(secs) * MS_PER_S + int(micros) // MS_PER_S
        pipe = self.client.pipeline(transaction=False)
        for runner_id in runner_ids:
            pipe.hmget(self.keys.runner(runner_id), ["status", "status_ms", "hb_ms"])
        res = await self._guard(pipe.execute())
        out: dict[str, bool | None] = {}
        for runner_id, (status, status_ms, hb_ms) in zip(runner_ids, res, strict=True):
            out[runner_id] = policy.presence(
                status,
                int(status_ms or 0),
                int(hb_ms or 0),
                now,
                heartbeat_online_ms=heartbeat_online_s * MS_PER_S,
            )
        return out

    # ---- outbox and expiry sweep --------------------------------------------------------

    async def read_outbox(self, runner_id: str) -> list[OutboxEntry]:
        """What a runner's outbox holds (oldest first, up to 200).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        raw: Any = await self._guard(
            self.client.xrange(self.keys.outbox(runner_id), "-", "+", count=200)
        )
        return parse_outbox(runner_id, raw or [])

    async def ack_outbox(
        self,
        runner_id: str,
        stream_ids: Sequence[str],
        *,
        shards: int,
        lease_s: float,
        also: Sequence[Call] = (),
    ) -> tuple[set[str], list[Any]]:
        """Delete published entries and drop the outbox's due mark, in one round trip.

        The batch is `ack_outbox` (deletes the entries; an emptied outbox is removed),
        `ZREM` of the runner's due mark, then `also` (calls of the caller's own to run in
        the same round trip). The mark cannot be dropped in the script (it lives in an
        index shard's slot, docs/design.md), so it is dropped unconditionally and written again
        when entries are left (another writer's, still in flight: due in `lease_s`
        seconds, the writer's own lease), a rare second round trip.
        On a single Redis the two commands of one pipeline run back to back; on a cluster
        a writer whose mark lands between them still publishes its own entries right
        away, and the SCAN at start is the backstop if it also dies in that window.

        Returns:
            The ids this call deleted (an entry another delivery deleted first is not among
            them: exactly one delivery owns each entry's history record), and the results
            of `also` in order.

        Raises:
            StoreUnavailable: Redis is unreachable.
            InternalError: Redis refused a call.
        """
        due = self.keys.outbox_due(self.keys.shard_of(runner_id, shards))
        calls: list[Call] = [
            ScriptCall("ack_outbox", (self.keys.outbox(runner_id),), tuple(stream_ids)),
            RawCall(("ZREM", due, runner_id)),
            *also,
        ]
        res = await self.batch(calls)
        left, deleted = int(res[0][0]), {str(i) for i in res[0][1]}
        if left:
            await self.call(self.outbox_due_call(runner_id, delay_s=lease_s, shards=shards))
        return deleted, res[2:]

    def outbox_due_call(self, runner_id: str, *, delay_s: float, shards: int) -> ScriptCall:
        """The `mark_due` call of a runner's outbox (see `mark_outbox_due`)."""
        key = self.keys.outbox_due(self.keys.shard_of(runner_id, shards))
        ttl_ms = OUTBOX_DUE_TTL_S * MS_PER_S
        return ScriptCall("mark_due", (key,), (runner_id, int(delay_s * MS_PER_S), "", 0, ttl_ms))

    async def mark_outbox_due(self, runner_id: str, *, delay_s: float, shards: int) -> None:
        """Note that a runner's outbox must be drained `delay_s` seconds from now at the latest.

        The delay is a lease for the instance that publishes it right away; others pass 0.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.call(self.outbox_due_call(runner_id, delay_s=delay_s, shards=shards))

    async def claim_due_outboxes(self, shard: int, *, limit: int, lease_s: float) -> list[str]:
        """Runner ids whose outbox is due in one shard, leased to the caller.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "claim_due", [self.keys.outbox_due(shard)], [limit, int(lease_s * MS_PER_S)]
        )
        return [str(m) for m in res]

    async def scan_outboxes(self) -> list[str]:
        """Runner ids of every non-empty outbox (SCAN; for recovery at start).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        marker = self.keys.outbox("\x00")
        head, tail = marker.split("\x00")
        found: list[str] = []
        async for key in self.client.scan_iter(match=f"{head}*{tail}", count=1000):
            found.append(str(key)[len(head) : len(str(key)) - len(tail)])
        return found

    async def runner_pages(self, size: int) -> AsyncIterator[list[str]]:
        """Ids of the runners the store keeps a hash for (SCAN), up to `size` at a time.

        What the presence reconciliation walks (`mqtt_pairing.presence`): a runner has a
        hash once it asked for a code or its status was recorded. SCAN's order; an id may
        come twice while keys are added.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        head = self.keys.runner("\x00").split("\x00")[0]
        pattern = f"{glob_escape(head)}*}}"  # not the runner's `...}:sessions` hash
        scan = self.client.scan_iter(match=pattern, count=1000).__aiter__()

        async def take() -> list[str]:
            keys: list[str] = []
            async for key in scan:
                keys.append(str(key)[len(head) : -1])
                if len(keys) >= size:
                    break
            return keys

        while page := await self._guard(take()):
            yield page

    def expiry_call(self, session: PairingSession, *, idle_ttl_s: int, shards: int) -> ScriptCall:
        """The `mark_due` call that puts a session in the expiry sets at its deadline."""
        member = f"{session.runner_id}\n{session.session_id}"
        key = self.keys.expiry(self.keys.shard_of(session.session_id, shards))
        deadline = session.last_seen_at_ms + idle_ttl_s * MS_PER_S
        return ScriptCall("mark_due", (key,), (member, 0, deadline, 1))

    def expiry_call_by_id(
        self, runner_id: str, session_id: str, *, idle_ttl_s: int, shards: int
    ) -> ScriptCall:
        """The `mark_due` call of a session about to open: due `idle_ttl_s` from now.

        Written with the open (a refused open leaves an entry whose session does not
        exist, which the sweep drops); `expire_session` checks `last_seen_at` anyway.
        """
        member = f"{runner_id}\n{session_id}"
        key = self.keys.expiry(self.keys.shard_of(session_id, shards))
        return ScriptCall("mark_due", (key,), (member, idle_ttl_s * MS_PER_S, "", 1))

    def unschedule_expiry_call(self, runner_id: str, session_id: str, *, shards: int) -> RawCall:
        """The `ZREM` of a session's idle deadline (a refused open's, see above)."""
        key = self.keys.expiry(self.keys.shard_of(session_id, shards))
        return RawCall(("ZREM", key, f"{runner_id}\n{session_id}"))

    async def schedule_expiry(
        self, session: PairingSession, *, idle_ttl_s: int, shards: int
    ) -> None:
        """Put a session in the expiry sets with its idle deadline.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.call(self.expiry_call(session, idle_ttl_s=idle_ttl_s, shards=shards))

    async def claim_due_expiries(
        self, shard: int, *, limit: int, lease_s: float
    ) -> list[tuple[str, str]]:
        """(runner_id, session_id) of sessions whose idle deadline passed, leased.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "claim_due", [self.keys.expiry(shard)], [limit, int(lease_s * MS_PER_S)]
        )
        pairs: list[tuple[str, str]] = []
        for member in res:
            runner_id, _, session_id = str(member).partition("\n")
            pairs.append((runner_id, session_id))
        return pairs

    async def expire_session(
        self, runner_id: str, session_id: str, *, idle_ttl_s: int, shards: int
    ) -> tuple[PairingSession | None, list[OutboxEntry]]:
        """Close a session idle for `idle_ttl_s`, or move its expiry entry to its deadline.

        Returns:
            (the closed session or None, the outbox entry this call wrote).

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "expire_session",
            [self.keys.runner_sessions(runner_id), self.keys.outbox(runner_id)],
            [session_id, idle_ttl_s * MS_PER_S],
        )
        key = self.keys.expiry(self.keys.shard_of(session_id, shards))
        member = f"{runner_id}\n{session_id}"
        if res[0] == "alive":
            # Runner traffic kept it alive: move its deadline, and keep the app's index
            # and the by-id lookup (other slots, with plain TTLs) alive as long.
            deadline_ms, app_id, now_ms = int(res[1]), str(res[2]), int(res[3])
            ttl_s = -(-(deadline_ms - now_ms) // MS_PER_S) + SESSION_KEYS_MARGIN_S
            await self.batch(
                [
                    ScriptCall("mark_due", (key,), (member, 0, deadline_ms, 1)),
                    RawCall(("EXPIRE", self.keys.app_sessions(app_id), ttl_s)),
                    RawCall(("EXPIRE", self.keys.session(session_id), ttl_s)),
                ]
            )
            return None, []
        await self._guard(self.client.zrem(key, member))
        if res[0] == "gone":
            return None, []
        closed = _session(res[1])
        await self.drop_session_indexes([closed])
        return closed, parse_outbox(runner_id, res[2])

    async def hold_presence_lease(
        self, holder: str, *, lease_s: float, release: bool = False
    ) -> bool:
        """Take or keep the presence-recording lease; True while `holder` has it.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        res = await self._run(
            "hold_lease",
            [self.keys.presence_leader()],
            [holder, int(lease_s * MS_PER_S), int(release)],
        )
        return int(res) == 1

    # ---- history ----------------------------------------------------------------------

    def history_calls(
        self,
        entries: Sequence[PairingHistoryEntry],
        *,
        max_len: int,
        identity_max_len: int,
        retention_s: int,
        shards: int,
    ) -> list[Call]:
        """The `append_history` calls for entries: global history and each identity's.

        One call per stream, with that stream's records in order (a pair's two records go
        to each of its three streams in three calls, not six).
        """
        retention_ms = retention_s * MS_PER_S
        streams: dict[str, tuple[int, list[str | int]]] = {}
        for entry in entries:
            fields: list[str | int] = []
            for name, value in entry.model_dump(exclude={"at_ms"}, exclude_none=True).items():
                fields += [name, str(value)]
            anchor = entry.app_id or entry.runner_id or entry.event
            shard = self.keys.shard_of(anchor, shards)
            targets = [(self.keys.history_global(shard), max_len)]
            if entry.runner_id:
                targets.append((self.keys.history("runner", entry.runner_id), identity_max_len))
            if entry.app_id:
                targets.append((self.keys.history("app", entry.app_id), identity_max_len))
            # session.opened / session.closed may come from two writers (the request and
            # the delivery that deleted the outbox entry; see append_history.lua); other
            # records have one, and skip the look-back.
            once = int(entry.event in ("session.opened", "session.closed"))
            for key, length in targets:
                streams.setdefault(key, (length, []))[1].extend((once, len(fields), *fields))
        return [
            ScriptCall("append_history", (key,), (length, retention_ms, 1, *records))
            for key, (length, records) in streams.items()
        ]

    async def append_history(
        self,
        entries: Sequence[PairingHistoryEntry],
        *,
        max_len: int,
        identity_max_len: int,
        retention_s: int,
        shards: int,
    ) -> None:
        """Append records to the global history and to each identity's history.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        await self.batch(
            self.history_calls(
                entries,
                max_len=max_len,
                identity_max_len=identity_max_len,
                retention_s=retention_s,
                shards=shards,
            )
        )

    # ---- bans and allowlist -----------------------------------------------------------

    async def set_ban(
        self, kind: Kind, ident: str, *, reason: str, by: str, duration_s: int | None
    ) -> None:
        """Ban an app or runner for `duration_s` seconds (None: permanent).

        Banning a runner cancels its active code (docs/protocol.md "Runner code").

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        other = self.keys.runner(ident) if kind == "runner" else self.keys.allow(kind, ident)
        old = await self._run(
            "set_ban",
            [self.keys.ban(kind, ident), other],
            [
                reason,
                by,
                -1 if duration_s is None else duration_s * MS_PER_S,
                int(kind == "runner"),
            ],
        )
        if old:
            await self.end_code(old, ident, "cancelled")

    async def remove_ban(self, kind: Kind, ident: str) -> bool:
        """Lift an admin ban; True if there was one.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        return bool(await self._guard(self.client.delete(self.keys.ban(kind, ident))))

    async def set_allowed(self, kind: Kind, ident: str, allowed: bool) -> None:
        """Add to (or remove from) the allowlist exempt from automatic penalties.

        Raises:
            StoreUnavailable: Redis is unreachable.
        """
        key = self.keys.allow(kind, ident)
        if allowed:
            await self._guard(self.client.set(key, "1"))
        else:
            await self._guard(self.client.delete(key))
