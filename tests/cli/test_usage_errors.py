"""Usage errors of every command are one `error:` line on stderr, exit 2, no traceback.

click's own rendering (a usage line, a hint and the message, which typer draws in a box)
is replaced by `mqtt_pairing.cli.main.OneLineErrors`. The commands are found by walking
the application, so a command added later is covered without being listed here.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import typer
from typer.core import TyperGroup
from typer.main import get_command

from mqtt_pairing.cli.common import CLICK_EXCEPTION, USAGE_ERROR
from mqtt_pairing.cli.main import app
from tests.cli.support import run_cli
from tests.harness.servers import REPO_ROOT

cli_main = importlib.import_module("mqtt_pairing.cli.main")  # the package exports `main`

EXIT_USAGE = 2
BOX_CHARACTERS = "╭╮╰╯│─"
SUBPROCESS_TIMEOUT_S = 60


def walk(command: object, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(path, click command) of every group and command under `command`."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, (*path, name))


ROOT = get_command(app)
ALL = [(path, command) for path, command in walk(ROOT)]
GROUPS = [path for path, command in ALL if hasattr(command, "commands")]
LEAVES = [path for path, command in ALL if not hasattr(command, "commands")]
COMMANDS = dict(ALL)


def required_missing(path: tuple[str, ...]) -> bool:
    """Whether the command has a required parameter (so no arguments is a usage error)."""
    params = getattr(COMMANDS[path], "params", [])
    return any(getattr(param, "required", False) for param in params)


def numeric_options(path: tuple[str, ...]) -> list[str]:
    """The first flag of every option of `path` that takes an integer or a number."""
    flags = []
    for param in getattr(COMMANDS[path], "params", []):
        # typer >= 0.2x describes a parameter's type by its annotation; click by `type`
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        kind = getattr(getattr(param, "type", None), "name", "")
        numeric = annotation in (int, float) or kind in {"integer", "float"}
        if numeric and getattr(param, "opts", None):
            flags.append(param.opts[0])
    return flags


def name(path: tuple[str, ...]) -> str:
    return " ".join(path) or "(root)"


def one_usage_line(args: list[str]) -> str:
    """Run `mqtt-pairing ARGS`; assert exit 2 and one `error:` line; return the line."""
    result = run_cli(*args)
    assert result.exit_code == EXIT_USAGE, (args, result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (args, result.stderr)
    assert lines[0].startswith("error: "), lines[0]
    assert result.stdout == "", (args, result.stdout)
    assert "Traceback" not in result.output
    assert "Usage:" not in result.output
    assert not any(c in result.output for c in BOX_CHARACTERS), result.output
    return lines[0]


def test_the_walk_finds_every_command() -> None:
    assert numeric_options(("history",)) == ["--limit"]
    # A guard on the walk itself: if it found nothing, every test below would be vacuous.
    for expected in [
        ("serve",),
        ("runner",),
        ("app", "pair"),
        ("app", "status"),
        ("credentials", "add"),
        ("history",),
        ("bans", "add"),
        ("sessions", "revoke"),
        ("codes", "list"),
        ("stats",),
    ]:
        assert expected in LEAVES
    assert {("app",), ("bans",), ("sessions",), ("codes",), ("credentials",)} <= set(GROUPS)


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=name)
def test_unknown_option_is_one_line(clean_env: None, path: tuple[str, ...]) -> None:
    line = one_usage_line([*path, "--no-such-option"])
    assert "--no-such-option" in line
    assert f"(see '{' '.join(('mqtt-pairing', *path))} --help')" in line


@pytest.mark.parametrize("path", [p for p in LEAVES if required_missing(p)], ids=name)
def test_missing_argument_or_option_is_one_line(clean_env: None, path: tuple[str, ...]) -> None:
    assert "missing" in one_usage_line(list(path))


@pytest.mark.parametrize("path", GROUPS, ids=name)
def test_group_without_command_prints_help_or_one_line(
    clean_env: None, path: tuple[str, ...]
) -> None:
    if getattr(COMMANDS[path], "no_args_is_help", False):
        result = run_cli(*path)
        assert result.exit_code == EXIT_USAGE
        assert "Usage" in result.stdout
        assert result.stderr == ""
    else:
        assert "missing command" in one_usage_line(list(path))


@pytest.mark.parametrize("path", GROUPS, ids=name)
def test_unknown_command_is_one_line(clean_env: None, path: tuple[str, ...]) -> None:
    assert "no such command 'frobnicate'" in one_usage_line([*path, "frobnicate"])


@pytest.mark.parametrize(
    ("path", "flag"),
    [(p, flag) for p in LEAVES for flag in numeric_options(p)],
    ids=lambda v: name(v) if isinstance(v, tuple) else v,
)
def test_value_of_the_wrong_type_is_one_line(
    clean_env: None, path: tuple[str, ...], flag: str
) -> None:
    line = one_usage_line([*path, flag, "twelve"])
    assert "invalid value" in line or "missing" in line


def test_choices_are_listed_on_the_one_line(clean_env: None) -> None:
    line = one_usage_line(["credentials", "add", "robot", "x1"])
    assert "'robot'" in line
    for choice in ("runner", "app", "service"):
        assert choice in line


def test_click_bases_are_found_through_typer() -> None:
    # What common.py relies on beyond typer's public API: BadParameter derives from click's
    # UsageError and ClickException, and click raises them when not in standalone mode.
    assert CLICK_EXCEPTION.__name__ == "ClickException"
    assert USAGE_ERROR.__name__ == "UsageError"
    assert issubclass(typer.BadParameter, USAGE_ERROR)
    assert issubclass(USAGE_ERROR, CLICK_EXCEPTION)
    with pytest.raises(USAGE_ERROR) as caught:
        TyperGroup.main(ROOT, ["nosuch"], prog_name="mqtt-pairing", standalone_mode=False)
    assert caught.value.exit_code == EXIT_USAGE  # type: ignore[attr-defined]
    assert caught.value.ctx is not None  # type: ignore[attr-defined]


def test_no_arguments_prints_the_help(clean_env: None) -> None:
    result = run_cli()
    assert result.exit_code == EXIT_USAGE
    assert "Usage" in result.stdout
    assert "serve" in result.stdout
    assert result.stderr == ""


def test_help_and_version_still_exit_0(clean_env: None) -> None:
    assert run_cli("bans", "--help").exit_code == 0
    version = run_cli("--version")
    assert version.exit_code == 0
    assert version.stdout.strip()


def test_the_console_script_prints_one_line(clean_env: None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MQTT_", "REDIS_", "PAIRING_"))}
    result = subprocess.run(
        [sys.executable, "-m", "mqtt_pairing", "bans", "add", "app"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == EXIT_USAGE, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: missing argument 'ID' (see 'mqtt-pairing bans add --help')"
    ]


def test_an_unexpected_exception_is_one_line_too(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = typer.Typer()

    @broken.command()
    def explode() -> None:
        raise RuntimeError("the first line\nand a second one")

    @broken.command()
    def other() -> None:
        """A second command, so that `explode` is a subcommand."""

    monkeypatch.setattr(cli_main, "app", broken)
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["explode"])
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "error: unexpected RuntimeError: the first line and a second one"
    ]
    assert "Traceback" not in captured.err
