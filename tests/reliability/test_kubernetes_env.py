"""`REDIS_URL` wins over whatever Kubernetes puts in `REDIS_PORT` (README, settings).

A Service named `redis` makes Kubernetes set `REDIS_PORT=tcp://<service ip>:6379` (and
`REDIS_SERVICE_HOST`, ...) in every pod of the namespace. With `REDIS_URL` (or
`REDIS_CLUSTER_URL`) set, `REDIS_HOST`, `REDIS_PORT` and `REDIS_DB` are ignored, whatever
they hold: `serve` starts and serves on real Mosquitto and Redis. Without it, the
link-style `REDIS_PORT` is still refused with one clear line.
"""

from __future__ import annotations

import subprocess
import sys

from tests.harness.servers import REPO_ROOT, MosquittoBroker, RedisServer
from tests.reliability.conftest import MakeServe
from tests.reliability.support import SECRET, clean_env

LINK_ENV = {
    "REDIS_PORT": "tcp://127.0.0.2:6379",
    "REDIS_PORT_6379_TCP": "tcp://127.0.0.2:6379",
    "REDIS_SERVICE_HOST": "127.0.0.2",
    "REDIS_SERVICE_PORT": "6379",
}


async def test_redis_url_wins_over_a_service_link_port(
    serve_process: MakeServe, mosquitto_broker: MosquittoBroker, redis_server: RedisServer
) -> None:
    serve = serve_process(
        MQTT_URL=mosquitto_broker.url,
        MQTT_CLIENT_ID="svc:k8s-link",
        REDIS_URL=redis_server.url,
        PAIRING_SECRET=SECRET,
        REDIS_HOST="127.0.0.2",
        REDIS_DB="tcp://127.0.0.2:6379",
        **LINK_ENV,
    )
    serve.start()
    await serve.wait_ready()
    assert serve.returncode is None


def test_a_service_link_port_without_redis_url_is_one_clear_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mqtt_pairing", "serve"],
        cwd=REPO_ROOT,
        env=clean_env(PAIRING_SECRET=SECRET, **LINK_ENV),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "REDIS_PORT" in lines[0]
    assert "REDIS_URL" in lines[0]
    assert "Traceback" not in done.stderr
