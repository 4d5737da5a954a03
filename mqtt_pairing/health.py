"""Liveness and readiness over HTTP, for Docker Compose and Kubernetes probes.

`GET /livez` answers 200 while the event loop runs. `GET /readyz` answers 200 when the
broker connection is up and Redis answers PING within its timeout, else 503 with a short
JSON reason. `GET /metrics` answers the instance's Prometheus metrics (`metrics.py`).
Anything else is 404. Enabled by `PAIRING_HEALTH_LISTEN` (`HOST:PORT`). The server is a
few lines over `asyncio.start_server` on purpose: three fixed GET routes need no web
framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]
Metrics = Callable[[], tuple[bytes, str]]
"""Renders the metrics: (body, content type)."""

_MAX_REQUEST_LINE = 1024
_READ_TIMEOUT_S = 5.0


class HealthServer:
    """A minimal HTTP/1.0 server with `/livez` and `/readyz`.

    Args:
        host: address to bind.
        port: TCP port (0 picks a free one; see `port` after `start`).
        ready: coroutine returning (ready, reason).
        metrics: renders `/metrics` (None: 404).
    """

    def __init__(
        self, host: str, port: int, ready: ReadyCheck, metrics: Metrics | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.ready = ready
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Start listening.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("health endpoints on http://%s:%d/livez and /readyz", self.host, self.port)

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT_S)
            parts = line[:_MAX_REQUEST_LINE].decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 and parts[0] in ("GET", "HEAD") else ""
            content_type = "application/json"
            if path == "/livez":
                status, body = 200, {"status": "ok"}
            elif path == "/readyz":
                ok, reason = await self.ready()
                status, body = (200 if ok else 503), {"status": "ok" if ok else reason}
            elif path == "/metrics" and self.metrics is not None:
                status, body = 200, {}
            else:
                status, body = 404, {"status": "not found"}
            if path == "/metrics" and status == 200 and self.metrics is not None:
                payload, content_type = self.metrics()
            else:
                payload = json.dumps(body).encode()
            reason_phrase = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            head = (
                f"HTTP/1.0 {status} {reason_phrase}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + payload)
            await writer.drain()
        except (TimeoutError, OSError, UnicodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
