"""`mqtt-pairing credentials check` and the compose entry point's check: identities are
safe by construction.

Mosquitto substitutes `%u` into the ACL patterns unless the username holds `+` or `#`,
but it lets `/` through: a username `rb/res/x` on the runners listener may write
`pairing/runners/rb/res/x/...`, under runner `rb`'s replies. And a name in two kinds'
files is two identities with one client id. `credentials add` never writes such files;
the check refuses them however they were written (plain `mosquitto_passwd`, an editor),
one line per problem, and the mosquitto container runs the same rules (in awk: the
image has no Python) before it starts or reloads. The last test holds the two
implementations to the same verdicts.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mqtt_pairing.cli.credentials import (
    CredentialKind,
    check_password_files,
)
from mqtt_pairing.cli.main import app as cli_app
from tests.harness.servers import require_binary
from tests.security.harness import SERVICE_USER, SecureBroker, Sniffer
from tests.security.mosquitto_conf import BROKER_CONFIG

pytestmark = pytest.mark.mosquitto  # mosquitto_passwd comes with mosquitto

ENTRYPOINT = BROKER_CONFIG / "docker-entrypoint.sh"
FILES = {"runner": "runners.passwd", "app": "apps.passwd", "service": "service.passwd"}
HASH = "$7$101$c2FsdHNhbHRzYWx0c2FsdA==$aGFzaA=="  # shape only: never used to log in
cli = CliRunner()


def add(directory: Path, kind: str, ident: str) -> None:
    result = cli.invoke(
        cli_app,
        ["credentials", "add", kind, ident, "--password-file", str(directory / FILES[kind])],
    )
    assert result.exit_code == 0, result.output


def check(directory: Path) -> tuple[int, str, str]:
    result = cli.invoke(cli_app, ["credentials", "check", str(directory)])
    return result.exit_code, result.stdout, result.stderr


def entrypoint(directory: Path, command: str, awk: str = "awk", **env: str) -> tuple[int, str]:
    """Run the container's entry point with broker-config at `directory`; (rc, stderr+out)."""
    bin_dir = directory.parent / f"bin-{Path(awk).name}"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "awk").exists():
        (bin_dir / "awk").symlink_to(shutil.which(awk) or awk)
    done = subprocess.run(
        ["sh", str(ENTRYPOINT), command],
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "MOSQUITTO_CONFIG_SRC": str(directory),
            "MOSQUITTO_CONFIG_DEST": str(directory.parent / "installed"),
            "MOSQUITTO_DATA_DIR": str(directory.parent / "data"),
            **env,
        },
        capture_output=True,  # bytes: text mode would turn a \r in a name into a newline
        timeout=30,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A copy of broker-config/ with password files made by `credentials add`."""
    require_binary("mosquitto_passwd")
    directory = tmp_path / "broker-config"
    shutil.copytree(BROKER_CONFIG, directory)
    add(directory, "service", SERVICE_USER)
    for ident in ("build-01", "build.02", "Edge_3"):
        add(directory, "runner", ident)
    for ident in ("phone-1", "tablet-2"):
        add(directory, "app", ident)
    return directory


def test_files_written_by_credentials_add_pass_both_checks(config_dir: Path) -> None:
    assert check(config_dir) == (
        0,
        f"ok: 3 runners, 2 apps, 1 service accounts in {config_dir}\n",
        "",
    )
    assert entrypoint(config_dir, "check") == (0, "")
    rc, output = entrypoint(config_dir, "install")
    assert rc == 0, output
    assert (config_dir.parent / "installed" / "runners.passwd").read_text() == (
        config_dir / "runners.passwd"
    ).read_text()


BAD_NAMES = ["a/b", "rb/res/x", "a+b", " #", "a#b", "+", "-lead", "a b", "x" * 65, "ü"]
"""As written in the file. A line starting with `#` is a comment to Mosquitto, so the
username `#` is written with a blank before it, which Mosquitto trims."""


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_outside_the_id_pattern_is_refused(config_dir: Path, name: str) -> None:
    path = config_dir / "runners.passwd"
    with path.open("a") as out:
        out.write(f"{name}:{HASH}\n")
    line = len(path.read_text().splitlines())
    rc, stdout, stderr = check(config_dir)
    assert rc == 1
    assert stdout == ""
    [problem] = stderr.splitlines()
    assert problem.startswith(f"error: {path}:{line}: ")
    assert f'"{name.strip()}" is not a valid id (1-64 characters of A-Z a-z 0-9' in problem.replace(
        "\\xfc", "ü"
    )
    rc, output = entrypoint(config_dir, "install")
    assert rc == 1
    assert f"{path}:{line}: " in output
    assert "nothing installed" in output
    assert not (config_dir.parent / "installed").exists()


@pytest.mark.parametrize(
    ("kind", "name", "flagged", "says"),
    [
        # Files are read runners, apps, service: the later occurrence is the one flagged.
        ("app", "build-01", ("app", 3), "is also a runner (runners.passwd:1)"),
        ("runner", "phone-1", ("app", 1), "is also a runner (runners.passwd:4)"),
        ("runner", SERVICE_USER, ("service", 1), "is also a runner (runners.passwd:4)"),
        ("service", "tablet-2", ("service", 2), "is also an app (apps.passwd:2)"),
        ("runner", "Edge_3", ("runner", 4), "is already on line 3"),
    ],
)
def test_a_name_twice_or_in_two_kinds_is_refused(
    config_dir: Path, kind: str, name: str, flagged: tuple[str, int], says: str
) -> None:
    with (config_dir / FILES[kind]).open("a") as out:
        out.write(f"{name}:{HASH}\n")
    rc, _, stderr = check(config_dir)
    assert rc == 1
    [problem] = stderr.splitlines()
    flagged_kind, flagged_line = flagged
    where = f"{config_dir / FILES[flagged_kind]}:{flagged_line}"
    assert problem.startswith(f'error: {where}: "{name}" ')
    assert says.replace("(", f"({config_dir}/") in problem
    rc, output = entrypoint(config_dir, "check")
    assert (rc, output) == (1, problem + "\n")


def test_one_line_per_problem_and_lines_as_mosquitto_reads_them(config_dir: Path) -> None:
    path = config_dir / "apps.passwd"
    with path.open("a") as out:
        out.write("# a comment: not an entry\n")
        out.write("no colon: not an entry either\n".replace(":", ""))
        out.write(f"  spaced-ok  :{HASH}\n")  # Mosquitto trims: user `spaced-ok`
        out.write(f":leading-colon:{HASH}\n")  # Mosquitto skips empty fields
        out.write("no-hash:\n")
        out.write(f"a/b:{HASH}\n")
        out.write(f"phone-1:{HASH}\n")
    rc, _, stderr = check(config_dir)
    assert rc == 1
    lines = stderr.splitlines()
    assert [line.split(": ", 2)[1] for line in lines] == [f"{path}:{n}" for n in (7, 8, 9)], lines
    assert lines[0].endswith('"no-hash" has no password hash (ignored)')
    rc, output = entrypoint(config_dir, "check")
    assert (rc, output.splitlines()) == (1, lines)


CONTROL_LINES = [
    b"bad\x00x:" + HASH.encode(),  # Mosquitto reads user `bad` without a hash
    b"\x00hidden:" + HASH.encode(),  # Mosquitto reads an empty line
    b"q:" + HASH.encode()[:6] + b"\x00" + HASH.encode()[6:],  # the hash cut short
    b"# comment \x00 build-01:" + HASH.encode(),
    b"esc\x1b[2J:" + HASH.encode(),
    b"del\x7f:" + HASH.encode(),
    b"ctl\x01:" + HASH.encode(),
]


@pytest.mark.parametrize("raw", CONTROL_LINES)
def test_a_nul_or_control_character_anywhere_on_a_line_is_refused(
    config_dir: Path, raw: bytes
) -> None:
    path = config_dir / "apps.passwd"
    with path.open("ab") as out:
        out.write(raw + b"\n")
    line = len(path.read_bytes().split(b"\n")) - 1
    rc, stdout, stderr = check(config_dir)
    assert (rc, stdout) == (1, "")
    assert stderr == (
        f"error: {path}:{line}: holds a NUL or other control character, which Mosquitto "
        "reads differently: remove the line and add the identity again with mqtt-pairing "
        "credentials add\n"
    )
    for awk in _AWKS:
        assert entrypoint(config_dir, "check", awk=awk) == (1, stderr), awk
    rc, output = entrypoint(config_dir, "install")
    assert rc == 1
    assert "nothing installed" in output
    # `credentials add` does not let mosquitto_passwd rewrite such a file (it would drop
    # or cut the line).
    before = path.read_bytes()
    result = cli.invoke(
        cli_app, ["credentials", "add", "app", "new-1", "--password-file", str(path)]
    )
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {path}:{line}: holds a NUL or other control character, which Mosquitto "
        "reads differently: remove the line and add the identity again with mqtt-pairing "
        "credentials add; nothing added (see: mqtt-pairing credentials check)\n"
    )
    assert path.read_bytes() == before


def test_no_password_file_at_all_is_one_line(tmp_path: Path) -> None:
    assert check(tmp_path) == (
        1,
        "",
        f"error: no password file in {tmp_path} (runners.passwd, apps.passwd, service.passwd)\n",
    )


async def test_a_slash_in_a_username_reaches_another_runners_replies(
    make_secure_broker: Callable[..., SecureBroker], uid: str
) -> None:
    """Why the check exists: Mosquitto's %u lets `/` through. A runner named
    `<victim>/res/x`, written with plain mosquitto_passwd, publishes under the victim's
    replies, and the victim reads it; `credentials add` and `check` refuse that name."""
    victim = f"rb-{uid}"
    broker = make_secure_broker(runners=[victim])
    evil = f"{victim}/res/x"
    refused = cli.invoke(
        cli_app,
        ["credentials", "add", "runner", evil, "--password-file", str(broker.conf_dir / "x")],
    )
    assert refused.exit_code == 2
    passwd = require_binary("mosquitto_passwd")
    subprocess.run(
        [
            passwd,
            "-b",
            str(broker.password_file("runner")),
            evil,
            "evil-password",
        ],
        check=True,
        capture_output=True,
    )
    broker.reload()
    problems = check_password_files({CredentialKind.RUNNER: broker.password_file("runner")})
    assert [p.message.split(" is ")[0] for p in problems] == [f'"{evil}"']
    forged = b'{"request_id":"x","ok":true,"result":{"code":"AAA-AAA-AAA"}}'
    async with Sniffer(broker.address("runner", victim), "victim") as inbox:
        await inbox.subscribe([f"pairing/runners/{victim}/res/#"])
        for _ in range(50):  # the reload is asynchronous
            try:
                async with Sniffer(
                    broker.address("runner", evil, password="evil-password"), "evil"
                ) as attacker:
                    await attacker.publish(f"pairing/runners/{evil}/status", forged)
                    await attacker.publish(f"pairing/runners/{evil}/req/code", forged)
                break
            except Exception:
                await asyncio.sleep(0.05)
        for _ in range(100):
            if len(inbox.received) == 2:
                break
            await asyncio.sleep(0.05)
    assert sorted(topic for topic, _ in inbox.received) == [
        f"pairing/runners/{victim}/res/x/req/code",
        f"pairing/runners/{victim}/res/x/status",
    ]


# -- The two implementations agree ---------------------------------------------------------

_NAME_CHARS = st.sampled_from([*list("abAB09._-/+#: \t"), "é", "\r", "\x01", "\x00", "\x7f"])
_lines = st.one_of(
    st.builds(
        lambda name, sep, hashed: f"{name}{sep}{hashed}",
        st.text(_NAME_CHARS, max_size=6) | st.sampled_from(["build-01", "phone-1", "x" * 65]),
        st.sampled_from([":", "::", " : ", ""]),
        st.sampled_from([HASH, "", " ", ":" + HASH]),
    ),
    st.sampled_from(["# comment", "", ":::", "   "]),
)
_files = st.fixed_dictionaries({kind: st.lists(_lines, max_size=5) | st.none() for kind in FILES})
_AWKS = [awk for awk in ("gawk", "mawk", "busybox") if shutil.which(awk)]


@pytest.mark.skipif(
    not _AWKS and os.environ.get("CI") != "true",
    reason="no awk to run the entry point's check with",
)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(files=_files)
def test_the_entrypoint_and_the_cli_give_the_same_verdicts(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, list[str] | None]
) -> None:
    assert _AWKS, "no awk (gawk, mawk or busybox) to run the entry point's check with"
    directory = tmp_path_factory.mktemp("parity") / "broker-config"
    directory.mkdir()
    for kind, lines in files.items():
        if lines is not None:
            (directory / FILES[kind]).write_bytes("\n".join(lines).encode() + b"\n")
    problems = check_password_files(
        {CredentialKind(kind): directory / name for kind, name in FILES.items()}
    )
    expected = [f"error: {p}" for p in problems]
    for awk in _AWKS:
        rc, output = entrypoint(directory, "check", awk=awk)
        assert rc == (1 if problems else 0), (awk, output)
        got = output.removesuffix("\n").split("\n") if output else []  # names may hold \r
        # Names are printed raw by awk, escaped by Python: compare where, then the text
        # of the lines whose names are plain ASCII.
        assert [line.split(": ", 2)[1] for line in got] == [
            line.split(": ", 2)[1] for line in expected
        ], awk
        for mine, theirs in zip(expected, got, strict=True):
            if mine.isascii() and "\\" not in mine:
                assert theirs == mine, awk
