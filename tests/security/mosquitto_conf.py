"""Reading and rendering `broker-config/mosquitto.conf` for the security tests.

The tests run the production configuration itself, not a copy written for them: its
listeners are moved to free loopback ports, its `/etc/mosquitto/pairing/` files to a
temporary directory, its persistence and log to the broker's own directory, and `user` is
set to the user running the tests (tests/harness/servers.py explains why). Everything else
(per-listener security, ACLs, client ids bound to usernames, `sys_interval 0`,
`max_packet_size`) is used as shipped. With `tls_dir`, the commented TLS listeners at the
end of the file are enabled the way README.md tells an operator to (the `#` in front of
each option removed), with `/etc/mosquitto/certs/` moved to `tls_dir`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BROKER_CONFIG = REPO_ROOT / "broker-config"
MOSQUITTO_CONF = BROKER_CONFIG / "mosquitto.conf"
INSTALL_DIR = "/etc/mosquitto/pairing/"
"""Where mosquitto.conf expects the files of broker-config/ (README.md, "Install")."""
CERT_DIR = "/etc/mosquitto/certs/"
"""Where the commented TLS listeners expect the server's certificate and key."""
TLS_SECTION = "# -- TLS"
"""The comment that opens the commented TLS listeners."""
_COMMENTED_OPTION = re.compile(r"^#(?=[a-z_]+ )")

_PASSWD_KIND = {"runners.passwd": "runner", "apps.passwd": "app", "service.passwd": "service"}


@dataclass
class Listener:
    """One `listener` block of a mosquitto.conf."""

    line_no: int
    port: int
    address: str | None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return self.options.get("protocol", "mqtt")

    @property
    def kind(self) -> str:
        """runner, app or service, from the listener's password file."""
        name = Path(self.options.get("password_file", "")).name
        return _PASSWD_KIND.get(name, "?")

    @property
    def tls(self) -> bool:
        """Whether the listener has a certificate (is a TLS listener)."""
        return "certfile" in self.options

    @property
    def key(self) -> str:
        """``runner``, ``app``, ``app-ws``, ``service``, and ``-tls`` after TLS ones."""
        key = self.kind + ("-ws" if self.protocol == "websockets" else "")
        return key + ("-tls" if self.tls else "")


def parse_listeners(text: str) -> list[Listener]:
    """The uncommented listener blocks of a mosquitto.conf, with the options that follow."""
    listeners: list[Listener] = []
    for no, raw in enumerate(text.splitlines()):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            port, _, address = value.strip().partition(" ")
            listeners.append(Listener(no, int(port), address.strip() or None))
        elif listeners:
            listeners[-1].options[key] = value.strip()
    return listeners


def global_option(text: str, name: str) -> str | None:
    """Value of an uncommented option that appears before the first listener."""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("listener "):
            return None
        key, _, value = line.partition(" ")
        if key == name:
            return value.strip()
    return None


def enable_tls_listeners(text: str) -> str:
    """`text` with the commented listener options of its TLS section uncommented.

    Raises:
        ValueError: the file has no TLS section, or it holds no commented listener.
    """
    lines = text.splitlines()
    try:
        start = next(n for n, line in enumerate(lines) if line.startswith(TLS_SECTION))
    except StopIteration:
        raise ValueError(f"no {TLS_SECTION!r} section") from None
    for n in range(start, len(lines)):
        lines[n] = _COMMENTED_OPTION.sub("", lines[n])
    enabled = "\n".join(lines) + "\n"
    if not any(listener.tls for listener in parse_listeners(enabled)):
        raise ValueError("the TLS section enables no TLS listener")
    return enabled


def render_for_test(
    *,
    conf_dir: Path,
    ports: dict[str, int],
    first_port_placeholder: str = "runner",
    tls_dir: Path | None = None,
) -> str:
    """broker-config/mosquitto.conf with test ports and paths.

    Args:
        conf_dir: where the ACL and password files are (replaces /etc/mosquitto/pairing/).
        ports: port per listener key (`Listener.key`): ``runner``, ``app``, ``app-ws``,
            ``service``, and with `tls_dir` ``runner-tls``, ``app-tls``, ``app-ws-tls``,
            ``service-tls``.
        first_port_placeholder: the listener whose port is left as ``{{PORT}}`` for
            `tests.harness.servers.MosquittoBroker` to fill in (the port it watches).
        tls_dir: enable the TLS listeners, with ``server.crt`` and ``server.key`` here.

    Returns:
        A template for `render_mosquitto_config` (placeholders {{PORT}}, {{DATA_DIR}},
        {{LOG_FILE}}, {{USER}}).

    Raises:
        ValueError: the shipped file no longer has what this rendering relies on.
    """
    text = MOSQUITTO_CONF.read_text()
    if tls_dir is not None:
        text = enable_tls_listeners(text).replace(CERT_DIR, f"{tls_dir}/")
    lines = text.splitlines()
    for listener in parse_listeners(text):
        key = listener.key
        if key not in ports:
            raise ValueError(f"unexpected listener {listener.port} ({key}) in {MOSQUITTO_CONF}")
        port = "{{PORT}}" if key == first_port_placeholder else str(ports[key])
        lines[listener.line_no] = f"listener {port} 127.0.0.1"
    rendered = "\n".join(lines) + "\n"
    replacements = [
        (r"(?m)^persistence_location .*$", "persistence_location {{DATA_DIR}}/"),
        (r"(?m)^log_dest stdout$", "log_dest file {{LOG_FILE}}"),
    ]
    for pattern, replacement in replacements:
        rendered, count = re.subn(pattern, replacement, rendered)
        if count != 1:
            raise ValueError(f"{MOSQUITTO_CONF}: expected one match of {pattern!r}")
    if INSTALL_DIR not in rendered:
        raise ValueError(f"{MOSQUITTO_CONF}: no {INSTALL_DIR} paths")
    rendered = rendered.replace(INSTALL_DIR, f"{conf_dir}/")
    return "# rendered from broker-config/mosquitto.conf by tests/security\nuser {{USER}}\n" + (
        rendered
    )
