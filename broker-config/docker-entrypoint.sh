#!/bin/sh
# Entry point of the mosquitto container of docker-compose.yml (image eclipse-mosquitto:2).
#
#   sh /config/docker-entrypoint.sh           install the configuration, then run mosquitto
#   sh /config/docker-entrypoint.sh reload    install it again and make mosquitto reread it
#                                             (after `mqtt-pairing credentials add ...`)
#   sh /config/docker-entrypoint.sh install   install only (used by the tests)
#   sh /config/docker-entrypoint.sh check     check the password files only
#
# Every command but `check` first checks the password files, as `mqtt-pairing credentials
# check` does (the image has no Python, so the same rules are written in awk below; a
# test holds the two to the same verdicts): every username a valid id, in one kind's
# file only, once. On a problem it prints one line per problem and installs nothing:
# the broker does not start, or a running one keeps its current files.
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

# The rules of mqtt_pairing/cli/credentials.py (check_password_files), on the files as
# Mosquitto 2.0 reads them: a line holding a NUL or another control character (but tab
# and carriage return) is refused for that alone; lines starting with # or without : are
# skipped; the username is the first non-empty :-separated field and the hash the next,
# trimmed of blanks. awk reads copies whose NUL bytes are turned into \001 (not every awk
# reads past a NUL), named as the originals in the messages.
check_credentials() {
    set --
    copies=$(mktemp -d)
    for name in runners apps service; do
        if [ -f "$src/$name.passwd" ]; then
            tr '\000' '\001' <"$src/$name.passwd" >"$copies/$name.passwd"
            set -- "$@" "$copies/$name.passwd"
        fi
    done
    if [ "$#" -eq 0 ]; then
        rm -rf "$copies"
        return 0
    fi
    verdict=0
    LC_ALL=C awk -v src="$src" '
        function trim(s) {
            sub(/^[ \t\r\n\v\f]+/, "", s)
            sub(/[ \t\r\n\v\f]+$/, "", s)
            return s
        }
        function problem(message) {
            print "error: " where ":" FNR ": " message
            bad = 1
        }
        FNR == 1 {
            kind = FILENAME
            sub(/^.*\//, "", kind)
            sub(/\.passwd$/, "", kind)
            where = src "/" kind ".passwd"
            label = (kind == "runners") ? "a runner" : (kind == "apps") ? "an app" : "a service account"
        }
        /[\001-\010\013\014\016-\037\177]/ {
            problem("holds a NUL or other control character, which Mosquitto reads differently: remove the line and add the identity again with mqtt-pairing credentials add")
            next
        }
        substr($0, 1, 1) == "#" || index($0, ":") == 0 { next }
        {
            line = $0
            sub(/^:+/, "", line)
            if (line == "") next
            i = index(line, ":")
            if (i == 0) { name = line; rest = "" } else { name = substr(line, 1, i - 1); rest = substr(line, i + 1) }
            sub(/^:+/, "", rest)
            name = trim(name)
            shown = "\"" name "\""
            if (rest == "") { problem(shown " has no password hash (ignored)"); next }
            if (length(name) > 64 || name !~ /^[A-Za-z0-9][A-Za-z0-9._-]*$/) {
                problem(shown " is not a valid id (1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
                next
            }
            if (!(name in first_kind)) {
                first_kind[name] = kind; first_label[name] = label
                first_where[name] = where ":" FNR; first_line[name] = FNR
            } else if (first_kind[name] == kind) {
                problem(shown " is already on line " first_line[name])
            } else {
                problem(shown " is also " first_label[name] " (" first_where[name] "); a username must belong to one kind")
            }
        }
        END { exit bad }
    ' "$@" || verdict=$?
    rm -rf "$copies"
    return "$verdict"
}

install_config() {
    if ! check_credentials >&2; then
        echo "docker-entrypoint: password files refused (see above): nothing installed;" \
            "fix them with: mqtt-pairing credentials add|remove ..." >&2
        return 1
    fi
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
    install_config || exit 1
    exec /usr/sbin/mosquitto -c "$dest/mosquitto.conf"
    ;;
reload)
    install_config || exit 1
    kill -HUP 1
    echo "docker-entrypoint: configuration reinstalled; mosquitto reloads it"
    ;;
install)
    install_config || exit 1
    ;;
check)
    check_credentials
    ;;
*)
    echo "usage: $0 [run|reload|install|check]" >&2
    exit 2
    ;;
esac
