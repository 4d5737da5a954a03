#!/bin/sh
# Entry point of the mosquitto container of docker-compose.yml (image eclipse-mosquitto:2).
#
#   sh /config/docker-entrypoint.sh           install the configuration, then run mosquitto
#   sh /config/docker-entrypoint.sh reload    install it again and make mosquitto reread it
#                                             (after `mqtt-pairing credentials add ...`)
#   sh /config/docker-entrypoint.sh install   install only (used by the tests)
#
# broker-config/ is mounted read-only at /config. Mosquitto reads its password files after
# dropping to its own user, which cannot read a host file of mode 600 owned by someone
# else, so the files are copied to /etc/mosquitto/pairing/ (the paths mosquitto.conf
# names), owned by that user, mode 600.
#
# One change is made to the copy of mosquitto.conf: a listener bound to 127.0.0.1 (the
# service listener) binds all of the container's interfaces instead, because the service
# runs in its own container. docker-compose.yml does not publish that port; only the
# internal network `backend` reaches it.
set -eu

src=${MOSQUITTO_CONFIG_SRC:-/config}
dest=${MOSQUITTO_CONFIG_DEST:-/etc/mosquitto/pairing}
data=${MOSQUITTO_DATA_DIR:-/var/lib/mosquitto}

install_config() {
    mkdir -p "$dest" "$data"
    for name in runners apps service; do
        cp "$src/$name.acl" "$dest/$name.acl"
        if [ -f "$src/$name.passwd" ]; then
            cp "$src/$name.passwd" "$dest/$name.passwd"
        else
            echo "docker-entrypoint: $src/$name.passwd is missing: no $name can log in" \
                "(create it with: mqtt-pairing credentials add ...)" >&2
            : >"$dest/$name.passwd"
        fi
    done
    sed 's/^\(listener [0-9][0-9]*\) 127\.0\.0\.1$/\1/' "$src/mosquitto.conf" >"$dest/mosquitto.conf"
    chmod 600 "$dest"/*.passwd
    chmod 644 "$dest"/*.acl "$dest/mosquitto.conf"
    if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then
        chown -R mosquitto:mosquitto "$dest" "$data"
    fi
}

case "${1:-run}" in
run)
    install_config
    exec /usr/sbin/mosquitto -c "$dest/mosquitto.conf"
    ;;
reload)
    install_config
    kill -HUP 1
    echo "docker-entrypoint: configuration reinstalled; mosquitto reloads it"
    ;;
install)
    install_config
    ;;
*)
    echo "usage: $0 [run|reload|install]" >&2
    exit 2
    ;;
esac
