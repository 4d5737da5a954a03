"""docker-compose.yml and the Dockerfile are wired as documented (CI has no Docker engine).

The file is parsed and checked against broker-config/ (listener ports, service account,
mounted paths), and the pieces that can run without Docker do run: the mosquitto
container's entry point installs the configuration, and its health check passes against
a broker running the shipped configuration.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from mqtt_pairing.config import check_service_client_id
from tests.harness.servers import RedisServer, free_port, require_binary
from tests.security.harness import SecureBroker, running_service
from tests.security.mosquitto_conf import (
    BROKER_CONFIG,
    MOSQUITTO_CONF,
    REPO_ROOT,
    Listener,
    parse_listeners,
)

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENTRYPOINT = BROKER_CONFIG / "docker-entrypoint.sh"
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Z][A-Z0-9_]*):\?[^}]+\}$")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    found = compose["services"]
    assert set(found) == {"mosquitto", "redis", "mqtt-pairing"}
    return found


@pytest.fixture(scope="module")
def listeners() -> dict[str, Listener]:
    by_key = {}
    for listener in parse_listeners(MOSQUITTO_CONF.read_text()):
        key = listener.kind + ("-ws" if listener.protocol == "websockets" else "")
        by_key[key] = listener
    assert set(by_key) == {"runner", "app", "app-ws", "service"}
    return by_key


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict), "environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def _published(service: dict[str, Any]) -> dict[int, int]:
    """Container port -> host port of the published ports."""
    out = {}
    for entry in service.get("ports", []):
        host, _, container = str(entry).rpartition(":")
        out[int(container)] = int(host)
    return out


def _networks(service: dict[str, Any]) -> set[str]:
    return set(service.get("networks", ["default"]))


def test_service_waits_for_healthy_broker_and_redis(services: dict[str, Any]) -> None:
    depends = services["mqtt-pairing"]["depends_on"]
    assert depends == {
        "mosquitto": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    for name in ("mosquitto", "redis", "mqtt-pairing"):
        assert services[name]["healthcheck"]["test"], name
        assert services[name].get("restart") == "unless-stopped"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_service_mqtt_url_is_the_service_account_on_the_service_listener(
    services: dict[str, Any], listeners: dict[str, Listener]
) -> None:
    env = _env(services["mqtt-pairing"])
    url = urlsplit(env["MQTT_URL"])
    assert url.scheme == "mqtt"
    assert url.hostname == "mosquitto"
    assert url.port == listeners["service"].port
    assert url.password is None, "the password comes from MQTT_PASSWORD, not the file"
    acl_users = re.findall(r"(?m)^user (\S+)$", (BROKER_CONFIG / "service.acl").read_text())
    assert acl_users == [url.username]
    # The service reaches the broker over a network they share, and Redis likewise.
    shared = _networks(services["mqtt-pairing"]) & _networks(services["mosquitto"])
    assert shared, "the service and mosquitto share no network"
    assert _networks(services["mqtt-pairing"]) & _networks(services["redis"])


def test_only_the_runner_and_app_listeners_are_published(
    compose: dict[str, Any], services: dict[str, Any], listeners: dict[str, Listener]
) -> None:
    published = _published(services["mosquitto"])
    expected = {listeners[k].port for k in ("runner", "app", "app-ws")}
    assert set(published) == expected
    assert listeners["service"].port not in published
    assert "ports" not in services["redis"]
    assert "ports" not in services["mqtt-pairing"]
    # Redis and the service sit on an internal network only.
    for name in ("redis", "mqtt-pairing"):
        for network in _networks(services[name]):
            assert compose["networks"][network].get("internal") is True, (name, network)


def test_redis_url_points_at_the_redis_service_with_persistence_on(
    services: dict[str, Any],
) -> None:
    url = urlsplit(_env(services["mqtt-pairing"])["REDIS_URL"])
    assert (url.scheme, url.hostname, url.port or 6379) == ("redis", "redis", 6379)
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_no_secret_value_is_committed(compose: dict[str, Any], services: dict[str, Any]) -> None:
    required = set()
    for name, service in services.items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                match = REQUIRED_VAR.match(value)
                assert match, f"{name}.{key} must be ${{VAR:?message}} with no default"
                required.add(match["name"])
            if "://" in value:
                assert urlsplit(value).password is None, f"{name}.{key} holds a password"
    assert required >= {"MQTT_SERVICE_PASSWORD", "PAIRING_SECRET"}
    assert _env(services["mqtt-pairing"])["PAIRING_SECRET"].startswith("${PAIRING_SECRET:?")
    text = COMPOSE_FILE.read_text()
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|SECRET)[A-Z_]*:-", text), "a secret default"
    # Neither the .env file nor real password files are in git.
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        tracked = subprocess.run(
            ["git", "ls-files", ".env", "broker-config/*.passwd"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert tracked == []


def test_mounted_paths_exist_in_the_repository(
    services: dict[str, Any], listeners: dict[str, Listener]
) -> None:
    mosquitto = services["mosquitto"]
    mounts = {}
    for volume in mosquitto["volumes"]:
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            assert (REPO_ROOT / source).exists(), source
            mounts[target] = REPO_ROOT / source
    config_dir = mounts["/config"]
    assert config_dir == REPO_ROOT / "broker-config"
    # The entry point runs a script from that mount...
    script = mosquitto["entrypoint"][-1]
    assert script.startswith("/config/")
    assert (config_dir / script.removeprefix("/config/")).is_file()
    # ...which installs the files mosquitto.conf names: ACLs from the repository and
    # password files the operator makes (documented by the *.passwd.example files).
    for listener in listeners.values():
        acl = Path(listener.options["acl_file"]).name
        passwd = Path(listener.options["password_file"]).name
        assert (config_dir / acl).is_file(), acl
        assert (config_dir / f"{passwd}.example").is_file(), passwd
    # Persistence is a volume at mosquitto.conf's persistence_location.
    location = re.search(r"(?m)^persistence_location (\S+)", MOSQUITTO_CONF.read_text())
    assert location is not None
    assert any(
        str(v).split(":")[1].rstrip("/") == location[1].rstrip("/") for v in mosquitto["volumes"]
    )
    assert services["mqtt-pairing"]["build"] == "."
    assert DOCKERFILE.is_file()


def test_dockerfile_builds_the_service_from_python_3_11_slim() -> None:
    lines = [
        line.strip()
        for line in DOCKERFILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    assert any(re.match(r"RUN pip install \.(\s|$)", line) for line in lines)
    assert lines[-1] == 'CMD ["mqtt-pairing", "serve"]'
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the service must not run as root"
    assert users[-1] not in ("root", "0")
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), source


def test_entrypoint_installs_the_config_with_the_service_listener_on_the_network(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    shutil.copytree(BROKER_CONFIG, src)
    for name in ("runners", "apps", "service"):
        (src / f"{name}.passwd").write_text(f"{name}-user:$7$101$hash\n")
    dest, data = tmp_path / "dest", tmp_path / "data"
    env = {
        **os.environ,
        "MOSQUITTO_CONFIG_SRC": str(src),
        "MOSQUITTO_CONFIG_DEST": str(dest),
        "MOSQUITTO_DATA_DIR": str(data),
    }
    subprocess.run(["sh", str(ENTRYPOINT), "install"], env=env, check=True, timeout=30)
    original = MOSQUITTO_CONF.read_text().splitlines()
    installed = (dest / "mosquitto.conf").read_text().splitlines()
    changed = [(a, b) for a, b in zip(original, installed, strict=True) if a != b]
    service_port = next(
        li.port for li in parse_listeners("\n".join(original)) if li.kind == "service"
    )
    assert changed == [(f"listener {service_port} 127.0.0.1", f"listener {service_port}")]
    for name in ("runners", "apps", "service"):
        mode = stat.S_IMODE((dest / f"{name}.passwd").stat().st_mode)
        assert mode == 0o600
        assert (dest / f"{name}.acl").read_text() == (BROKER_CONFIG / f"{name}.acl").read_text()
    assert data.is_dir()


@pytest.mark.mosquitto
def test_mosquitto_healthcheck_passes_against_the_shipped_config(
    make_secure_broker: Callable[..., SecureBroker],
    services: dict[str, Any],
    listeners: dict[str, Listener],
) -> None:
    require_binary("mosquitto_sub")
    test = services["mosquitto"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("$$", "$")
    broker = make_secure_broker()
    for key in ("runner", "app", "service"):
        command = re.sub(rf"\b{listeners[key].port}\b", str(broker.ports[key]), command)
    env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin"}
    assert subprocess.run(["sh", "-c", command], env=env, timeout=30, check=False).returncode == 0
    broker.stop()
    assert subprocess.run(["sh", "-c", command], env=env, timeout=30, check=False).returncode != 0


@pytest.mark.mosquitto
@pytest.mark.redis
async def test_service_healthcheck_passes_against_a_running_service(
    make_secure_broker: Callable[..., SecureBroker],
    redis_server: RedisServer,
    key_prefix: str,
    services: dict[str, Any],
) -> None:
    service_def = services["mqtt-pairing"]
    listen = _env(service_def)["PAIRING_HEALTH_LISTEN"]
    host = listen.rpartition(":")[0]
    assert host == "127.0.0.1", "the health endpoints stay inside the container"
    test = service_def["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert f"http://{listen}/readyz" in test[3]
    probe_port = free_port()
    command = [sys.executable, "-c", test[3].replace(listen, f"127.0.0.1:{probe_port}")]
    broker = make_secure_broker()
    async with running_service(
        broker, redis_server.url, key_prefix, pairing_health_listen=f"127.0.0.1:{probe_port}"
    ):
        done = await asyncio.to_thread(subprocess.run, command, timeout=30, check=False)
        assert done.returncode == 0
    done = await asyncio.to_thread(
        subprocess.run, command, timeout=30, check=False, capture_output=True
    )
    assert done.returncode != 0


def test_the_service_client_id_is_one_no_device_can_have(services: dict[str, Any]) -> None:
    check_service_client_id(_env(services["mqtt-pairing"])["MQTT_CLIENT_ID"])
