"""`mqtt-pairing credentials add|remove`: Mosquitto's own hashing, one-line errors, exit codes.

That the entries it writes authenticate against a real broker is proven by every test
that uses `make_secure_broker` (its password files are written by this command) and by
test_identity.py (rotation and revocation).
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mqtt_pairing.cli import credentials
from mqtt_pairing.cli.main import app
from tests.harness.servers import require_binary

pytestmark = pytest.mark.mosquitto  # mosquitto_passwd comes with mosquitto

runner = CliRunner()


@pytest.fixture(autouse=True)
def _needs_mosquitto_passwd() -> None:
    require_binary("mosquitto_passwd")


def invoke(*args: str) -> Any:
    return runner.invoke(app, ["credentials", *args])


def _entries(path: Path) -> dict[str, str]:
    return dict(line.split(":", 1) for line in path.read_text().splitlines() if line)


def test_add_generates_a_password_prints_it_once_and_stores_only_mosquittos_hash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "runners.passwd"
    result = invoke("add", "runner", "build-01", "--password-file", str(path))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "username: build-01"
    password = lines[1].removeprefix("password: ")
    assert len(lines) == 2
    assert len(password) >= 32
    assert result.stdout.count(password) == 1
    assert password not in result.stderr
    entries = _entries(path)
    assert list(entries) == ["build-01"]
    # Mosquitto's PBKDF2-SHA512 format ($7$), made by mosquitto_passwd, not by us.
    assert entries["build-01"].startswith("$7$")
    assert password not in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_add_with_a_given_password_does_not_echo_it(tmp_path: Path) -> None:
    path = tmp_path / "apps.passwd"
    result = invoke(
        "add", "app", "phone-1", "--password", "correct horse", "--password-file", str(path)
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == "username: phone-1\n"
    assert "correct horse" not in result.output
    assert list(_entries(path)) == ["phone-1"]


def test_the_password_never_appears_on_a_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[list[str]] = []
    real_run = subprocess.run

    def spy(args: list[str], **kwargs: Any) -> Any:
        seen.append(list(args))
        return real_run(args, **kwargs)

    monkeypatch.setattr(credentials.subprocess, "run", spy)
    path = tmp_path / "runners.passwd"
    result = invoke(
        "add", "runner", "r1", "--password", "pw-on-stdin", "--password-file", str(path)
    )
    assert result.exit_code == 0, result.output
    assert seen
    assert all("pw-on-stdin" not in arg for args in seen for arg in args)


def test_default_password_file_follows_the_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broker-config").mkdir()
    monkeypatch.chdir(tmp_path)
    for kind, file in (("runner", "runners"), ("app", "apps"), ("service", "service")):
        result = invoke("add", kind, f"{kind}-1")
        assert result.exit_code == 0, result.output
        assert list(_entries(tmp_path / "broker-config" / f"{file}.passwd")) == [f"{kind}-1"]


LABELS = {"runner": "a runner", "app": "an app", "service": "a service account"}


@pytest.mark.parametrize(
    ("first", "second"),
    [("runner", "app"), ("app", "runner"), ("service", "runner"), ("app", "service")],
)
def test_an_id_of_another_kind_in_the_same_directory_is_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    files = {"runner": "runners", "app": "apps", "service": "service"}
    path = {kind: str(tmp_path / f"{name}.passwd") for kind, name in files.items()}
    assert invoke("add", first, "x-1", "--password-file", path[first]).exit_code == 0
    again = invoke("add", second, "x-1", "--password-file", path[second])
    assert again.exit_code == 1
    assert again.stderr == (
        f"error: 'x-1' is already {LABELS[first]} "
        f"({path[first]}); a username must belong to one kind: pick another id\n"
    )
    assert not Path(path[second]).exists()


def test_adding_an_existing_id_is_refused_unless_replace(tmp_path: Path) -> None:
    path = tmp_path / "runners.passwd"
    assert invoke("add", "runner", "r1", "--password-file", str(path)).exit_code == 0
    before = path.read_text()
    again = invoke("add", "runner", "r1", "--password-file", str(path))
    assert again.exit_code == 1
    assert again.stderr.startswith("error: ")
    assert "--replace" in again.stderr
    assert len(again.stderr.splitlines()) == 1
    assert path.read_text() == before
    replaced = invoke("add", "runner", "r1", "--replace", "--password-file", str(path))
    assert replaced.exit_code == 0, replaced.output
    assert path.read_text() != before
    assert list(_entries(path)) == ["r1"]


@pytest.mark.parametrize(
    "ident", ["", "-lead", "a/b", "a+b", "a#b", "a:b", "a b", "x" * 65, "ü", "a\nb"]
)
def test_a_malformed_id_is_a_usage_error(tmp_path: Path, ident: str) -> None:
    path = tmp_path / "apps.passwd"
    result = invoke("add", "--password-file", str(path), "--", "app", ident)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ID: ")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output
    assert not path.exists()


@pytest.mark.parametrize("ident", ["a\x00b", "\x00", "a\x1bb", "a\x7f", "a\tb", "a\rb"])
def test_an_id_with_a_nul_or_control_character_is_one_clear_line(
    tmp_path: Path, ident: str
) -> None:
    path = tmp_path / "apps.passwd"
    result = invoke("add", "--password-file", str(path), "--", "app", ident)
    assert result.exit_code == 2
    assert result.stderr == (
        "error: ID: must not contain a NUL or other control character (newline, tab, ...)\n"
    )
    assert not path.exists()


@pytest.mark.parametrize("password", ["", "two\nlines", "tab\there", "x" * 257, "nul\x00"])
def test_a_password_mosquitto_passwd_cannot_take_is_a_usage_error(
    tmp_path: Path, password: str
) -> None:
    path = tmp_path / "apps.passwd"
    result = invoke("add", "app", "a1", "--password", password, "--password-file", str(path))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --password: ")
    assert password not in result.stderr or not password
    assert not path.exists()


def test_an_unknown_kind_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("add", "robot", "r1", "--password-file", str(tmp_path / "x.passwd"))
    assert result.exit_code == 2


def test_missing_mosquitto_passwd_is_one_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "find_mosquitto_passwd", lambda: None)
    for args in (("add", "runner", "r1"), ("remove", "runner", "r1")):
        result = invoke(*args, "--password-file", str(tmp_path / "r.passwd"))
        assert result.exit_code == 1
        assert result.stderr.startswith("error: mosquitto_passwd not found")
        assert len(result.stderr.splitlines()) == 1
        assert "Traceback" not in result.output


def test_lookup_finds_mosquitto_passwd_outside_path(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = credentials.find_mosquitto_passwd()
    assert expected is not None
    monkeypatch.setenv("PATH", "/nonexistent")
    found = credentials.find_mosquitto_passwd()
    assert found is not None
    assert Path(found).name == "mosquitto_passwd"


def test_a_missing_directory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = invoke("add", "app", "a1", "--password-file", str(tmp_path / "nope" / "apps.passwd"))
    assert result.exit_code == 1
    assert result.stderr == f"error: directory {tmp_path / 'nope'} does not exist\n"


def test_remove_deletes_the_entry_and_refuses_an_unknown_id(tmp_path: Path) -> None:
    path = tmp_path / "runners.passwd"
    for ident in ("r1", "r2"):
        assert invoke("add", "runner", ident, "--password-file", str(path)).exit_code == 0
    removed = invoke("remove", "runner", "r1", "--password-file", str(path))
    assert removed.exit_code == 0, removed.output
    assert list(_entries(path)) == ["r2"]
    again = invoke("remove", "runner", "r1", "--password-file", str(path))
    assert again.exit_code == 1
    assert again.stderr == f"error: 'r1' is not in {path}\n"
    missing = invoke("remove", "runner", "r1", "--password-file", str(tmp_path / "none"))
    assert missing.exit_code == 1
    bad = invoke("remove", "runner", "a/b", "--password-file", str(path))
    assert bad.exit_code == 2


def test_help_shows_examples() -> None:
    result = invoke("add", "--help")
    assert result.exit_code == 0
    assert "mqtt-pairing credentials add runner build-01" in result.stdout
    assert "--password-file" in result.stdout
    assert invoke("remove", "--help").exit_code == 0
    assert "credentials" in runner.invoke(app, ["--help"]).stdout
