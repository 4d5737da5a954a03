# The mqtt-pairing service image (used by docker-compose.yml).
#
#   docker build -t mqtt-pairing .
#   docker run --rm -e MQTT_URL=... -e REDIS_URL=... -e PAIRING_SECRET=... mqtt-pairing
#
# Only the package is copied in (never broker-config/*.passwd, .env or the venv); settings
# come from the environment (README, "Settings").
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml README.md ./
COPY mqtt_pairing ./mqtt_pairing
RUN pip install . && rm -rf /build

# No root at run time; the service writes no files.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin mqtt-pairing
USER mqtt-pairing
WORKDIR /

# SIGTERM (docker stop) lets in-flight requests finish (PAIRING_SHUTDOWN_GRACE_S).
STOPSIGNAL SIGTERM
CMD ["mqtt-pairing", "serve"]
