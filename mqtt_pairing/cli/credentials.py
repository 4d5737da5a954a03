"""`mqtt-pairing credentials`: provision and check broker identities in password files.

The broker, not the service, authenticates clients (docs/design.md, "Security model"), and
`broker-config/mosquitto.conf` gives each kind of client its own listener and password
file. The service trusts the id in a topic because every username the broker accepts is
a well-formed id of one kind only (docs/security.md, "Identities"): `add` refuses
anything else, and `check` refuses password files, however they were written, that break
the rule. Hashing is Mosquitto's own: an entry is written by `mosquitto_passwd` (found on
PATH or in /usr/bin, /usr/sbin), never by this module. The password is handed to it on
stdin, not on its command line, so it never shows in the process list.

Exit codes: 0 success, 1 a runtime error (no `mosquitto_passwd`, the user exists or is
missing, the file cannot be written) or, for `check`, problems found, 2 bad usage (a
malformed id or password).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import subprocess
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mqtt_pairing.cli.common import EXIT_ERROR, EXIT_USAGE, fail
from mqtt_pairing.topics import is_valid_id

__all__ = [
    "DEFAULT_PASSWORD_FILES",
    "PASSWORD_FILE_NAMES",
    "SERVICE_USERNAME",
    "CredentialError",
    "CredentialKind",
    "CredentialProblem",
    "add_credential",
    "check_password_files",
    "control_lines",
    "credentials_app",
    "find_mosquitto_passwd",
    "generate_password",
    "read_entries",
    "read_usernames",
    "remove_credential",
]


class CredentialKind(StrEnum):
    """The kinds of broker identity; each has its own listener and password file."""

    RUNNER = "runner"
    APP = "app"
    SERVICE = "service"


PASSWORD_FILE_NAMES: dict[CredentialKind, str] = {
    CredentialKind.RUNNER: "runners.passwd",
    CredentialKind.APP: "apps.passwd",
    CredentialKind.SERVICE: "service.passwd",
}
"""File name of each kind's password file, as `broker-config/mosquitto.conf` names them."""

DEFAULT_DIRECTORY = Path("broker-config")

DEFAULT_PASSWORD_FILES: dict[CredentialKind, Path] = {
    kind: DEFAULT_DIRECTORY / name for kind, name in PASSWORD_FILE_NAMES.items()
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
    the password file; the id rule excludes `/`, `+`, `#`, `:` and whitespace. A NUL or
    another control character gets a message of its own.

    Raises:
        CredentialError: the username is malformed (exit code 2).
    """
    if any(unicodedata.category(c) == "Cc" for c in username):
        raise CredentialError(
            "ID: must not contain a NUL or other control character (newline, tab, ...)",
            EXIT_USAGE,
        )
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


_C_SPACE = " \t\n\v\f\r"
"""What C's isspace() trims in Mosquitto's password file parser (C locale)."""

_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""Bytes no line of a password file may hold: NUL and the control characters other than
tab and carriage return (which Mosquitto trims). Mosquitto reads a line as a C string,
so a NUL hides the rest of it; `credentials add` never writes any of them."""

_CONTROL_MESSAGE = (
    "holds a NUL or other control character, which Mosquitto reads differently: remove "
    "the line and add the identity again with mqtt-pairing credentials add"
)


@dataclass(frozen=True, slots=True)
class PasswordEntry:
    """One line of a password file as Mosquitto 2.0 reads it.

    Attributes:
        line: 1-based line number.
        username: the username Mosquitto sees (trimmed of blanks).
        has_password: False when the line has no password field (Mosquitto skips it).
    """

    line: int
    username: str
    has_password: bool


def control_lines(path: Path) -> list[int]:
    """1-based numbers of the lines of `path` that hold a NUL or other control character.

    Every line counts, comments and lines without `:` included (`_CONTROL_BYTES`).

    Returns:
        The line numbers; an empty list when the file does not exist.

    Raises:
        CredentialError: the file exists but cannot be read.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    return [n for n, raw in enumerate(data.split(b"\n"), start=1) if _CONTROL_BYTES.search(raw)]


def read_entries(path: Path) -> list[PasswordEntry]:
    """The entries of a Mosquitto password file, parsed the way Mosquitto 2.0 parses it.

    Mosquitto (`pwfile__parse`, src/security_default.c) skips lines that start with `#`
    or hold no `:`; it takes the first non-empty `:`-separated field as the username and
    the next as the password hash, each trimmed of blanks, so `  x :h` is user `x`.

    Args:
        path: the password file.

    Returns:
        The entries in file order; an empty list when the file does not exist.

    Raises:
        CredentialError: the file exists but cannot be read.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc.strerror}") from None
    entries = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.decode("utf-8", errors="surrogateescape")
        if line.startswith("#") or ":" not in line:
            continue
        fields = [f for f in line.split(":") if f]
        if not fields:
            continue
        entries.append(PasswordEntry(number, fields[0].strip(_C_SPACE), len(fields) > 1))
    return entries


def read_usernames(path: Path) -> set[str]:
    """Usernames in a Mosquitto password file (`username:hash` lines).

    Args:
        path: the password file.

    Returns:
        The usernames; an empty set when the file does not exist.

    Raises:
        CredentialError: the file exists but cannot be read.
    """
    return {entry.username for entry in read_entries(path) if entry.has_password}


@dataclass(frozen=True, slots=True)
class CredentialProblem:
    """One thing wrong with the password files; `str()` is the line `check` prints."""

    path: Path
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


_ID_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"


def _with_article(kind: CredentialKind) -> str:
    label = _KIND_LABEL[kind]
    return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"


def _shown(name: str) -> str:
    """A username safe to print: quoted, control and odd characters escaped."""
    return '"' + name.encode("unicode_escape", "backslashreplace").decode("ascii") + '"'


def check_password_files(files: dict[CredentialKind, Path]) -> list[CredentialProblem]:
    """Everything that breaks "one well-formed id, one kind" in a set of password files.

    The rules (docs/security.md, "Identities"), in file order (runners, apps, service):

    - a username must match the id pattern (docs/protocol.md, "Identities"): a `/`, `+`
      or `#` would reach the `%u` ACL patterns, and an id with another shape could not
      be used in a topic;
    - a username appears once in its file, and in one kind's file only (the service's
      included): on the shipped listeners a client id is the username, and a name in
      two kinds would be two identities sharing one client id;
    - a line has a password hash (Mosquitto ignores one without);
    - no line holds a NUL or another control character but tab and carriage return
      (Mosquitto reads a line as a C string: a NUL hides the rest of it). Such a line
      is reported for that alone.

    Args:
        files: the password file of each kind; a missing file holds no identity.

    Returns:
        One problem per offending line, in file order; empty when all is well.

    Raises:
        CredentialError: a file exists but cannot be read.
    """
    problems: list[CredentialProblem] = []
    seen: dict[str, tuple[CredentialKind, Path, int]] = {}
    for kind in CredentialKind:
        path = files.get(kind)
        if path is None:
            continue
        controlled = set(control_lines(path))
        entries = {entry.line: entry for entry in read_entries(path)}
        for number in sorted(controlled | entries.keys()):
            if number in controlled:
                problems.append(CredentialProblem(path, number, _CONTROL_MESSAGE))
                continue
            entry = entries[number]
            name = entry.username
            if not entry.has_password:
                problems.append(
                    CredentialProblem(
                        path, entry.line, f"{_shown(name)} has no password hash (ignored)"
                    )
                )
                continue
            if not is_valid_id(name):
                problems.append(
                    CredentialProblem(
                        path, entry.line, f"{_shown(name)} is not a valid id ({_ID_RULE})"
                    )
                )
                continue
            first = seen.get(name)
            if first is None:
                seen[name] = (kind, path, entry.line)
            elif first[0] is kind:
                problems.append(
                    CredentialProblem(
                        path, entry.line, f"{_shown(name)} is already on line {first[2]}"
                    )
                )
            else:
                problems.append(
                    CredentialProblem(
                        path,
                        entry.line,
                        f"{_shown(name)} is also {_with_article(first[0])} "
                        f"({first[1]}:{first[2]}); a username must belong to one kind",
                    )
                )
    return problems


def _sibling_files(path: Path) -> dict[CredentialKind, Path]:
    """The password files of every kind beside `path` (same directory, usual names)."""
    return {kind: path.parent / name for kind, name in PASSWORD_FILE_NAMES.items()}


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
    kind: CredentialKind | None = None,
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
        kind: the kind `path` holds; when given, the id must not be in the password
            file of another kind beside `path` (`PASSWORD_FILE_NAMES`).
        replace: set a new password if the user exists, instead of refusing.
        binary: the `mosquitto_passwd` to run (default: `find_mosquitto_passwd`).

    Raises:
        CredentialError: malformed id or password (exit code 2), no `mosquitto_passwd`,
            the user already exists (without `replace`) or is of another kind, or the
            file cannot be written.
    """
    check_username(username)
    check_password(password)
    found = _require_binary(binary)
    if bad := control_lines(path):
        # mosquitto_passwd rewrites the file line by line, as C strings.
        raise CredentialError(
            f"{path}:{bad[0]}: {_CONTROL_MESSAGE}; nothing added (see: mqtt-pairing "
            "credentials check)"
        )
    if kind is not None:
        for other, sibling in _sibling_files(path).items():
            if other is not kind and username in read_usernames(sibling):
                raise CredentialError(
                    f"{username!r} is already {_with_article(other)} ({sibling}); a username "
                    "must belong to one kind: pick another id"
                )
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
        add_credential(path, ident, secret, kind=kind, replace=replace)
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


@credentials_app.command("check")
def check(
    directory: Annotated[
        Path,
        typer.Argument(
            metavar="[DIR]",
            help="Directory of runners.passwd, apps.passwd and service.passwd.",
            file_okay=False,
        ),
    ] = DEFAULT_DIRECTORY,
) -> None:
    """Check the password files: every username a valid id, of one kind only.

    Prints one line per problem and exits 1, or a summary and exits 0. Run it after
    writing the files with plain mosquitto_passwd; the mosquitto container of
    docker-compose.yml runs the same check before it starts or reloads. Examples:

        mqtt-pairing credentials check

        mqtt-pairing credentials check /etc/mosquitto/pairing
    """
    files = {kind: directory / name for kind, name in PASSWORD_FILE_NAMES.items()}
    if not any(path.exists() for path in files.values()):
        fail(f"no password file in {directory} ({', '.join(PASSWORD_FILE_NAMES.values())})")
    try:
        problems = check_password_files(files)
        counts = {kind: len(read_usernames(path)) for kind, path in files.items()}
    except CredentialError as exc:
        fail(str(exc), exc.exit_code)
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(EXIT_ERROR)
    typer.echo(
        f"ok: {counts[CredentialKind.RUNNER]} runners, {counts[CredentialKind.APP]} apps, "
        f"{counts[CredentialKind.SERVICE]} service accounts in {directory}"
    )
