"""Auto-pipelining: the Redis calls of concurrent requests share round trips.

Every batch of commands a request sends (`Transport.batch`, one script call, one command)
is queued; once per event-loop turn the queue is written to Redis as one exchange (one
write on one connection, the replies read back in order) and each batch gets its own
slice of the replies. At most `max_exchanges` exchanges are on the wire at once: batches
that arrive meanwhile wait and go out together in the next one, so the number of round
trips (and the CPU each costs the event loop: a connection from the pool, a write, a
wake-up) grows with time, not with the number of requests in flight, and the number of
connections stays small (docs/design.md "Redis connections"). This is what the
auto-pipelining clients of other languages do (ioredis, Lettuce); redis-py has none.

Order: the commands of one batch run in order, back to back in one exchange; batches of
one request run in the order it awaits them. Batches of different requests have no order
between them (they never had: they ran on different pooled connections).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

Command = tuple[str | int | float, ...]
Exchange = Callable[[list[Command]], Awaitable[list[Any]]]

MAX_EXCHANGES = 2
"""Exchanges on the wire at once, per store (per Redis server)."""


class Coalescer:
    """Queues batches of commands and runs them in shared exchanges.

    Args:
        exchange: writes commands in one round trip and returns their replies in order
            (an error reply in its command's place); raises on a connection error or
            timeout, which every batch of that exchange then raises.
        max_exchanges: exchanges running at once (`MAX_EXCHANGES`).
    """

    def __init__(self, exchange: Exchange, *, max_exchanges: int = MAX_EXCHANGES) -> None:
        self._exchange = exchange
        self._max = max(1, max_exchanges)
        self._pending: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]] = []
        self._running = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.exchanges = 0
        """Exchanges made so far (round trips on the wire), for benchmarks."""
        self.batches = 0
        """Batches sent so far (what callers asked for), for benchmarks."""

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        """Run `commands` in the next shared exchange; their replies, in order.

        Raises:
            whatever the exchange raised (connection errors, timeouts). Cancelling the
            caller before its exchange starts keeps its commands off the wire; after,
            they run and the replies are dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._pending.append((commands, future))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._running < self._max:
            self._scheduled = True
            loop.call_soon(self._start)

    def _start(self) -> None:
        self._scheduled = False
        if self._running >= self._max:
            return  # the next exchange to finish starts this one
        queued = [(c, f) for c, f in self._pending if not f.done()]
        self._pending = []
        if not queued:
            return
        self._running += 1
        task = asyncio.get_running_loop().create_task(self._run_exchange(queued))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_exchange(
        self, queued: list[tuple[Sequence[Command], asyncio.Future[list[Any]]]]
    ) -> None:
        try:
            commands = [command for batch, _ in queued for command in batch]
            self.exchanges += 1
            self.batches += len(queued)
            try:
                replies = await self._exchange(commands)
            except asyncio.CancelledError:
                for _, future in queued:
                    future.cancel()
                raise
            except Exception as exc:
                for _, future in queued:
                    if not future.done():
                        future.set_exception(exc)
                return
            start = 0
            for batch, future in queued:
                end = start + len(batch)
                if not future.done():
                    future.set_result(replies[start:end])
                start = end
        finally:
            self._running -= 1
            if self._pending:
                self._schedule(asyncio.get_running_loop())

    async def aclose(self) -> None:
        """Cancel the exchanges still running (their callers get CancelledError)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
