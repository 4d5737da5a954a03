"""README's settings tables and `mqtt_pairing/config.py` say the same thing.

Every field of `Settings` appears, as its environment variable, in a README table row,
and where its default is a number the row gives that number (`2,592,000 (30 days)` for
2592000, `0.5` for 0.5). Rows for one setting may be repeated in several tables; each
must agree. A README row naming a setting `Settings` does not have is refused too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mqtt_pairing.config import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")
_NUMBER = re.compile(r"^-?\d[\d,]*(\.\d+)?")
_PREFIXES = ("MQTT_", "REDIS_", "PAIRING_")


def _rows() -> list[tuple[list[str], str]]:
    """(setting names of the first cell, the second cell) of every README table row."""
    rows = []
    for line in README.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        names = [n for n in _NAME.findall(cells[0]) if n.startswith(_PREFIXES)]
        if names and len(cells) >= 2:
            rows.append((names, cells[1]))
    return rows


def _defaults_by_name() -> dict[str, list[str]]:
    """Each setting's default cell(s), split per name when a row holds several."""
    found: dict[str, list[str]] = {}
    for names, cell in _rows():
        parts = cell.split(", ")
        for n, name in enumerate(names):
            found.setdefault(name, []).append(parts[n] if len(parts) == len(names) else cell)
    return found


FIELDS = sorted(Settings.model_fields)


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_has_a_readme_row_with_its_default(field: str) -> None:
    cells = _defaults_by_name().get(field.upper())
    assert cells, f"{field.upper()} is not in README's settings tables"
    default = Settings.model_fields[field].get_default(call_default_factory=False)
    if isinstance(default, bool) or not isinstance(default, int | float):
        return
    for cell in cells:
        number = _NUMBER.match(cell)
        assert number, f"{field.upper()}: README says {cell!r}, the default is {default}"
        assert float(number.group().replace(",", "")) == default, (field, cell)


def test_the_readme_names_no_setting_that_does_not_exist() -> None:
    known = {name.upper() for name in FIELDS}
    named = {name for names, _ in _rows() for name in names}
    assert named - known == set()


def test_defaults_given_in_words() -> None:
    cells = _defaults_by_name()
    assert "`mqtt-pairing:<hostname>`" in cells["MQTT_CLIENT_ID"][0]
    assert "derived from `PAIRING_SECRET`" in cells["PAIRING_SHARED_GROUP"][0]
    assert cells["MQTT_TLS_INSECURE"] == ["`false`"]
    assert cells["MQTT_PROTOCOL"] == ["`5`"]
