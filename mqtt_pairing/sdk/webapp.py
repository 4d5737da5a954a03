"""`mqtt-pairing web`: serve the reference web app of `web/` for trying it (docs/sdk.md).

A small static server (the standard library's `ThreadingHTTPServer`) for a source
checkout: the page, its two scripts, MQTT.js from `web/node_modules` (after `npm ci` in
`web/`), the SAS word list from this package, and `config.json` with the broker's
WebSockets URL and the topic prefix. Nothing else is served. For production, copy the same
files to any static host.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

import typer

from mqtt_pairing.cli.common import fail

__all__ = ["WebApp", "default_web_dir", "web"]

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/sas.js": ("sas.js", "text/javascript; charset=utf-8"),
    "/node_modules/mqtt/dist/mqtt.esm.js": (
        "node_modules/mqtt/dist/mqtt.esm.js",
        "text/javascript; charset=utf-8",
    ),
}
MQTT_JS = "node_modules/mqtt/dist/mqtt.esm.js"


def default_web_dir() -> Path:
    """`web/` of the source checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "web"


@dataclass
class WebApp:
    """The web app's server.

    Attributes:
        directory: the `web/` directory (with `node_modules/` from `npm ci`).
        mqtt_url: the broker's WebSockets URL the page offers (`ws://host:8083/mqtt`).
        prefix: the topic prefix the page uses.
    """

    directory: Path
    mqtt_url: str
    prefix: str = "pairing"

    def check(self) -> None:
        """Raise FileNotFoundError naming what is missing (the page or MQTT.js)."""
        for name in ("index.html", "app.js", "sas.js", MQTT_JS):
            if not (self.directory / name).is_file():
                raise FileNotFoundError(self.directory / name)

    def server(self, host: str, port: int) -> ThreadingHTTPServer:
        """A server bound to host:port (0 for a free port); call `serve_forever`."""
        app = self
        config = json.dumps({"mqtt_url": self.mqtt_url, "prefix": self.prefix}).encode()
        words = resources.files("mqtt_pairing").joinpath("sas_words.txt").read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                if path == "/config.json":
                    self._send(config, "application/json")
                elif path == "/sas-words.txt":
                    self._send(words, "text/plain; charset=utf-8")
                elif path in _FILES:
                    name, content_type = _FILES[path]
                    try:
                        body = (app.directory / name).read_bytes()
                    except OSError:
                        self.send_error(HTTPStatus.NOT_FOUND)
                        return
                    self._send(body, content_type)
                else:
                    self.send_error(HTTPStatus.NOT_FOUND)

            def _send(self, body: bytes, content_type: str) -> None:
                self.send_response(HTTPStatus.OK)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        return ThreadingHTTPServer((host, port), Handler)

    def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
        """Serve in a daemon thread; returns the server (call `shutdown`) and its URL."""
        server = self.server(host, port)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        bound_host, bound_port = server.server_address[:2]
        return server, f"http://{bound_host!s}:{bound_port}/"


def web(
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to serve on.")] = (
        "127.0.0.1:8080"
    ),
    mqtt_url: Annotated[
        str, typer.Option("--mqtt-url", help="The broker's WebSockets URL the page offers.")
    ] = "ws://127.0.0.1:8083/mqtt",
    prefix: Annotated[str, typer.Option("--prefix", help="Topic prefix.")] = "pairing",
    directory: Annotated[
        Path | None, typer.Option("--dir", help="The web/ directory (default: the checkout's).")
    ] = None,
) -> None:
    """Serve the reference web app (web/) for trying it in a browser.

    Run `npm ci` in web/ first (it brings MQTT.js). For example:

        mqtt-pairing web --listen 127.0.0.1:8080 --mqtt-url ws://127.0.0.1:8083/mqtt
    """
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        fail("--listen: expected HOST:PORT", 2)
    app = WebApp(directory or default_web_dir(), mqtt_url, prefix)
    try:
        app.check()
    except FileNotFoundError as exc:
        fail(f"{exc.args[0]} is missing (run `npm ci` in web/ of a source checkout)")
    try:
        server = app.server(host, int(port))
    except OSError as exc:
        fail(f"cannot listen on {listen}: {exc.strerror}")
    typer.echo(f"web app on http://{listen}/ (broker {mqtt_url}); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
