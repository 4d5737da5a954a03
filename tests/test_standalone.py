"""The repository stands alone: it refers to nothing outside itself, and its citations hold.

A user clones the repository and nothing else. So no file may point outside it (a `../`
that climbs out, a machine path, a document that only exists beside the project), and
every citation of a document under `docs/` must name a file that exists and, where it
names a section (`docs/protocol.md "Codes"`), a heading of that file. A quotation
(`docs/design.md: "Nagle's algorithm ..."`) must be found in the file it quotes, and
every `[text](#anchor)` inside `docs/*.md` must lead to a heading of the same page.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()
"""This file: its examples of bad references are not references."""

_SKIP_DIRS = frozenset(
    {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"}
)
_SKIP_DIRS_UNDER = ("build/", "dist/", "benchmarks/results/")

MACHINE_PATH = re.compile(r"(?<![\w.$}])/(?:work|home|Users|root|mnt)/[\w.-]+|[A-Za-z]:\\Users\\")
"""Absolute paths that only exist on somebody's machine."""

OUTSIDE_DOCUMENT = re.compile(r"\b(?:shared/)?(?:PROTOCOL|DESIGN|STYLE)\.md\b|\.\./shared\b")
"""Documents that lived beside the project, never in it."""

PARENT_PATH = re.compile(r"(?:\.\./)+[\w.-][\w./-]*")

DOC_PATH = re.compile(r"\bdocs/([\w.-]+\.(?:md|yaml|yml|json))\b")

# `docs/x.md` (maybe in backticks), maybe a comma, then one or more quoted section names
# joined by commas or "and": docs/protocol.md "Payloads", "App pair"
SECTION_CITATION = re.compile(
    r"""docs/(?P<doc>[\w.-]+\.md)`?,?\s+\(?(?P<names>(?:(?P<q>["'])[^"'\n]{1,80}(?P=q)"""
    r"""(?:\s*(?:,|and)\s*)?)+)"""
)
QUOTED = re.compile(r"""(["'])([^"'\n]{1,80})\1""")
# `docs/x.md: "quoted text` (the quotation may be cut by the end of the line)
QUOTATION = re.compile(r"""docs/(?P<doc>[\w.-]+\.md)`?:\s+"(?P<text>[^"\n]{8,})""")

HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
ANCHOR_LINK = re.compile(r"\]\(#([^)\s]+)\)")

# A line break inside a docstring, comment or paragraph, with what starts the next line.
_LINE_BREAK = re.compile(r"\s*\n\s*(?:#+(?!\w)|--|//|\*(?!\*))?\s*")


@dataclass(frozen=True)
class Problem:
    path: str
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def repository_files() -> list[Path]:
    """Files of the repository: tracked or new (not ignored), else a walk of the tree."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
        for root, dirs, files in os.walk(REPO_ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
            rel = Path(root).relative_to(REPO_ROOT)
            names.extend(str(rel / f) for f in files)
    return sorted(
        REPO_ROOT / n
        for n in names
        if (REPO_ROOT / n).is_file() and not n.replace(os.sep, "/").startswith(_SKIP_DIRS_UNDER)
    )


def text_of(path: Path) -> str | None:
    """The file as text, or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@cache
def texts() -> dict[str, str]:
    out = {}
    for path in repository_files():
        text = text_of(path)
        if text is not None:
            out[path.relative_to(REPO_ROOT).as_posix()] = text
    return out


def flat(text: str) -> str:
    """`text` with line breaks (and comment leaders after them) made single spaces."""
    return _LINE_BREAK.sub(" ", text)


def plain(text: str) -> str:
    """Markdown text without emphasis and code marks, whitespace collapsed, lower case."""
    return " ".join(text.replace("**", "").replace("`", "").split()).lower()


def headings(doc: str) -> set[str]:
    return {plain(h) for h in HEADING.findall(texts()[doc])}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", plain(heading)).replace(" ", "-")


def outside_references(rel: str, text: str) -> list[Problem]:
    problems = [Problem(rel, f"machine path {m.group(0)!r}") for m in MACHINE_PATH.finditer(text)]
    problems += [
        Problem(rel, f"a document outside the repository: {m.group(0)!r}")
        for m in OUTSIDE_DOCUMENT.finditer(text)
    ]
    here = (REPO_ROOT / rel).parent
    for m in PARENT_PATH.finditer(text):
        target = (here / m.group(0)).resolve()
        if not target.is_relative_to(REPO_ROOT):
            problems.append(Problem(rel, f"a path outside the repository: {m.group(0)!r}"))
    return problems


def citations(rel: str, text: str) -> list[Problem]:
    problems = []
    docs = texts()
    for m in DOC_PATH.finditer(text):
        if f"docs/{m.group(1)}" not in docs:
            problems.append(Problem(rel, f"cites docs/{m.group(1)}, which does not exist"))
    joined = flat(text)
    for m in SECTION_CITATION.finditer(joined):
        doc = f"docs/{m.group('doc')}"
        if doc not in docs:
            continue  # reported above
        for _, name in QUOTED.findall(m.group("names")):
            if plain(name) not in headings(doc):
                problems.append(Problem(rel, f'cites {doc} "{name}": no such section'))
    for m in QUOTATION.finditer(joined):
        doc = f"docs/{m.group('doc')}"
        quoted = plain(m.group("text"))
        if doc in docs and quoted not in plain(flat(docs[doc])):
            problems.append(Problem(rel, f'quotes {doc}: "{m.group("text")}", not found there'))
    return problems


def anchors(rel: str, text: str) -> list[Problem]:
    if not (rel.startswith("docs/") and rel.endswith(".md")):
        return []
    targets = {slug(h) for h in HEADING.findall(text)}
    return [
        Problem(rel, f"link to #{a}: no such heading")
        for a in ANCHOR_LINK.findall(text)
        if a not in targets
    ]


def test_the_scan_sees_the_repository() -> None:
    # Guards against a vacuous pass: the files and the citations below must be found.
    found = texts()
    for rel in ("README.md", "docs/protocol.md", "docs/design.md", "mqtt_pairing/codes.py"):
        assert rel in found
    cited = [m for text in found.values() for m in SECTION_CITATION.finditer(flat(text))]
    assert len(cited) > 50
    assert {"identities", "topics", "payloads", "codes", "error codes", "default limits"} <= (
        headings("docs/protocol.md")
    )


def test_nothing_refers_outside_the_repository() -> None:
    problems = [p for rel, text in texts().items() for p in outside_references(rel, text)]
    problems = [p for p in problems if p.path != SELF]
    assert problems == [], "\n".join(map(str, problems))


def test_cited_documents_and_sections_exist() -> None:
    problems = [p for rel, text in texts().items() for p in citations(rel, text)]
    problems = [p for p in problems if p.path != SELF]
    assert problems == [], "\n".join(map(str, problems))


def test_links_inside_the_docs_lead_to_headings() -> None:
    problems = [p for rel, text in texts().items() for p in anchors(rel, text)]
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see ../shared/PROTOCOL.md", 2),
        ("Vectors: `vectors/payloads.json` beside PROTOCOL.md", 1),
        ("open /work/shared/DESIGN.md", 2),
        ("path /home/alice/project", 1),
        ("Path(__file__).parent / '../../../etc'", 1),
        ("${TMPDIR:-/tmp}/x and /etc/mosquitto/pairing and docs/../README.md", 0),
    ],
)
def test_outside_references_are_recognised(text: str, expected: int) -> None:
    assert len(outside_references("tests/unit/example.py", text)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('docs/protocol.md "Codes" and "Topics"', 0),
        ('(`docs/protocol.md`, "Expired\n  codes")', 0),
        ("docs/protocol.md 'Payloads': app", 0),
        ('docs/protocol.md "Runner code"', 0),
        ('docs/protocol.md "No such section"', 1),
        ('docs/design.md "Redis keys", "Nowhere"', 1),
        ("docs/nowhere.md", 1),
        ("docs/design.md: \"Nagle's algorithm costs about 40 ms per hop", 0),
        ('docs/design.md: "a sentence the page never says', 1),
    ],
)
def test_citations_are_recognised(text: str, expected: int) -> None:
    assert len(citations("mqtt_pairing/example.py", text)) == expected
