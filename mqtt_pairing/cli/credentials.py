"""`mqtt-pairing credentials`: provision broker identities in Mosquitto password files.

The broker, not the service, authenticates clients (docs/design.md, "Security model"), and
`broker-config/mosquitto.conf` gives each kind of client its own listener and password
file, so a username belongs to one kind only. These commands add and remove one entry of
one of those files. Hashing is Mosquitto's own: the entry is written by `mosquitto_passwd`
(found on PATH or in /usr/bin, /usr/sbin), never by this module. The password is handed
to it on stdin, not on its command line, so it never shows in the process list.

Exit codes: 0 success, 1 a runtime error (no `mosquitto_passwd`, the user exists or is
missing, the file cannot be written), 2 bad usage (a malformed id or password).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import unicodedata
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mqtt_pairing.cli.common import EXIT_ERROR, EXIT_USAGE, fail
from mqtt_pairing.topics import is_valid_id

__all__ = [
    "DEFAULT_PASSWORD_FILES",
    "SERVICE_USERNAME",
    "CredentialError",
    "CredentialKind",
    "add_credential",
    "credentials_app",
    "find_mosquitto_passwd",
    "generate_password",
    "read_usernames",
    "remove_credential",
]


class CredentialKind(StrEnum):
    """The kinds of broker identity; each has its own listener and password file."""

    RUNNER = "runner"
    APP = "app"
    SERVICE = "service"


DEFAULT_PASSWORD_FILES: dict[CredentialKind, Path] = {
    CredentialKind.RUNNER: Path("broker-config/runners.passwd"),
    CredentialKind.APP: Path("broker-config/apps.passwd"),
    CredentialKind.SERVICE: Path("broker-config/service.passwd"),
}
"""Password file of each kind, relative to the working directory (`broker-config/`)."""

SERVICE_USERNAME = "mqtt-pairing"
"""The service account that `broker-config/service.acl` grants."""

GENERATED_PASSWORD_BYTES = 24
"""Randomness of a generated password: 192 bits, 32 URL-safe characters."""

MAX_PASSWORD_CHARS = 256
"""Longest password accepted (MQTT allows 65535 bytes; nobody types more than this)."""

PASSWD_TIMEOUT_S = 30.0
"""How long `mosquitto_passwd` may take (it hashes with PBKDF2, a few milliseconds)."""

_SEARCH_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
"""Searched after PATH: Debian keeps mosquitto's tools outside some users' PATH."""

_KIND_LABEL = {
    CredentialKind.RUNNER: "runner",
    CredentialKind.APP: "app",
    CredentialKind.SERVICE: "service account",
}

_RELOAD_HINT = (
    "reload the broker: kill -HUP $(pidof mosquitto); with Docker Compose: "
    "docker compose exec mosquitto sh /config/docker-entrypoint.sh reload"
)


class CredentialError(Exception):
    """Provisioning failed; the message is one line and holds no password.

    Attributes:
        exit_code: 1 for a runtime error, 2 for bad usage.
    """

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def find_mosquitto_passwd() -> str | None:
    """Path of the `mosquitto_passwd` executable (PATH, then /usr/bin, /usr/sbin), or None."""
    return shutil.which("mosquitto_passwd") or shutil.which(
        "mosquitto_passwd", path=os.pathsep.join(_SEARCH_DIRS)
    )


def generate_password() -> str:
    """A fresh password from the CSPRNG: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)


def check_username(username: str) -> None:
    """Refuse a username that is not a well-formed id (docs/protocol.md, "Identities").

    Mosquitto would substitute such a name into `%u` ACL patterns, or (with `:`) break
    the password file; the id rule excludes `/`, `+`, `#`, `:` and whitespace.

    Raises:
        CredentialError: the username is malformed (exit code 2).
    """
    if not is_valid_id(username):
        raise CredentialError(
            "ID: 1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
            EXIT_USAGE,
        )


def check_password(password: str) -> None:
    """Refuse a password `mosquitto_passwd` cannot take whole from stdin.

    Raises:
        CredentialError: empty, longer than `MAX_PASSWORD_CHARS`, or holding a control
            or format character such as a newline (exit code 2).
    """
    if not password:
        raise CredentialError("--password: must not be empty", EXIT_USAGE)
    if len(password) > MAX_PASSWORD_CHARS:
        raise CredentialError(f"--password: at most {MAX_PASSWORD_CHARS} characters", EXIT_USAGE)
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in password):
        raise CredentialError(
            "--password: must not contain control characters (newline, tab, ...)", EXIT_USAGE
        )


def read_usernames(path: Path) -> set[str]:
    """Usernames in a Mosquitto password file (`username:hash` lines).

    Args:
        path: the password file.

    Returns:
        The usernames; an empty set when the file does not exist.

    Raises:
        CredentialError: the file exists but cannot be read.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    names = set()
    for line in text.splitlines():
        name, sep, _hash = line.partition(":")
        if sep and name and not name.startswith("#"):
            names.add(name)
    return names


def _create_private(path: Path) -> None:
    """Create an empty password file readable by its owner only (mode 600)."""
    if not path.parent.is_dir():
        raise CredentialError(f"directory {path.parent} does not exist")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError as exc:
        raise CredentialError(f"cannot create {path}: {exc.strerror}") from None
    os.close(fd)


def _run_passwd(binary: str, args: list[str], stdin: str | None) -> None:
    try:
        done = subprocess.run(  # noqa: S603 - a fixed binary, no shell
            [binary, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=PASSWD_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CredentialError(f"mosquitto_passwd failed: {exc}") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        detail = lines[-1] if lines else f"exit code {done.returncode}"
        raise CredentialError(f"mosquitto_passwd failed: {detail}")


def _require_binary(binary: str | None) -> str:
    found = binary or find_mosquitto_passwd()
    if found is None:
        raise CredentialError(
            "mosquitto_passwd not found on PATH or in /usr/bin, /usr/sbin "
            "(install it: apt-get install mosquitto, or the eclipse-mosquitto image)"
        )
    return found


def add_credential(
    path: Path,
    username: str,
    password: str,
    *,
    replace: bool = False,
    binary: str | None = None,
) -> None:
    """Add `username` with `password` to a Mosquitto password file.

    The file is created (mode 600) if missing; its directory must exist. The hash is
    made by `mosquitto_passwd`, which gets the password on stdin.

    Args:
        path: the password file.
        username: the id (checked with `is_valid_id`).
        password: the clear password (checked with `check_password`).
        replace: set a new password if the user exists, instead of refusing.
        binary: the `mosquitto_passwd` to run (default: `find_mosquitto_passwd`).

    Raises:
        CredentialError: malformed id or password (exit code 2), no `mosquitto_passwd`,
            the user already exists (without `replace`), or the file cannot be written.
    """
    check_username(username)
    check_password(password)
    found = _require_binary(binary)
    if not replace and username in read_usernames(path):
        raise CredentialError(
            f"{username!r} already exists in {path}; use --replace to set a new password"
        )
    _create_private(path)
    _run_passwd(found, [str(path), username], stdin=f"{password}\n{password}\n")


def remove_credential(path: Path, username: str, *, binary: str | None = None) -> None:
    """Remove `username` from a Mosquitto password file.

    Raises:
        CredentialError: malformed id (exit code 2), no `mosquitto_passwd`, no such
            file or user, or the file cannot be written.
    """
    check_username(username)
    found = _require_binary(binary)
    if not path.exists():
        raise CredentialError(f"{path} does not exist")
    if username not in read_usernames(path):
        raise CredentialError(f"{username!r} is not in {path}")
    _run_passwd(found, ["-D", str(path), username], stdin=None)


def _readable_by_others(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return bool(mode & (stat.S_IRWXG | stat.S_IRWXO))


credentials_app = typer.Typer(
    help=(
        "Provision broker identities (runners, apps, the service) in Mosquitto password "
        "files, hashed by mosquitto_passwd."
    ),
    no_args_is_help=True,
)

KindArg = Annotated[
    CredentialKind,
    typer.Argument(
        metavar="KIND", help="runner, app or service: picks the listener's password file."
    ),
]
IdArg = Annotated[str, typer.Argument(metavar="ID", help="The id, which is the MQTT username.")]
PasswordFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--password-file",
        help="Password file (default: broker-config/{runners,apps,service}.passwd by kind).",
        dir_okay=False,
    ),
]


def _console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@credentials_app.command("add")
def add(
    kind: KindArg,
    ident: IdArg,
    password_file: PasswordFileOpt = None,
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            help="Use this password (visible in the process list and shell history); "
            "default: generate one and print it once.",
        ),
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="Set a new password if the ID exists.")
    ] = False,
) -> None:
    """Add an identity to its kind's password file; print its username and password.

    A generated password is printed once, on stdout (`password: ...`).
    Store it now: the file keeps only its hash.
    Then reload the broker (kill -HUP). Examples:

        mqtt-pairing credentials add runner build-01

        mqtt-pairing credentials add app phone-7f3a --password-file apps.passwd

        mqtt-pairing credentials add service mqtt-pairing --replace
    """
    path = password_file or DEFAULT_PASSWORD_FILES[kind]
    generated = password is None
    secret = generate_password() if password is None else password
    try:
        add_credential(path, ident, secret, replace=replace)
    except CredentialError as exc:
        fail(str(exc), exc.exit_code)
    console = _console()
    console.print(f"added {_KIND_LABEL[kind]} [bold]{ident}[/bold] to {path}", markup=True)
    typer.echo(f"username: {ident}")
    if generated:
        typer.echo(f"password: {secret}")
        console.print("the password is shown only this once: store it now", markup=False)
    if kind is CredentialKind.SERVICE and ident != SERVICE_USERNAME:
        console.print(
            f"note: service.acl grants only user {SERVICE_USERNAME}; add a block for {ident}",
            markup=False,
        )
    if _readable_by_others(path):
        console.print(
            f"warning: {path} is readable by others; chmod 600 it (owner: the broker's user)",
            markup=False,
        )
    console.print(_RELOAD_HINT, markup=False)


@credentials_app.command("remove")
def remove(kind: KindArg, ident: IdArg, password_file: PasswordFileOpt = None) -> None:
    """Remove an identity from its kind's password file (exit 1 if it is not there).

    Then reload the broker (kill -HUP). Example:

        mqtt-pairing credentials remove runner build-01
    """
    path = password_file or DEFAULT_PASSWORD_FILES[kind]
    try:
        remove_credential(path, ident)
    except CredentialError as exc:
        fail(str(exc), exc.exit_code)
    console = _console()
    console.print(f"removed {_KIND_LABEL[kind]} [bold]{ident}[/bold] from {path}", markup=True)
    console.print(_RELOAD_HINT, markup=False)
